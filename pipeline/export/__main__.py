"""python -m pipeline.export RECIPE [key=value ...]"""

from pipeline.export.stage import main

raise SystemExit(main())
