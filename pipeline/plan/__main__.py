from pipeline.plan.cli import main

raise SystemExit(main())
