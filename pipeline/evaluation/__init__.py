"""What pipeline.eval measures and writes, apart from the stage's order (pipeline/eval.py).

    recipe      EvalRecipe and its sections; check_eval_launch (the preflight reads them here)
    models      the models to compare, each loaded merged as export merges it; the processes
    data        held-out rows and the source of each packed document
    perplexity  loss and perplexity per source with the routing statistics, in one pass
    passkey     the passkey retrieval grid (context length x depth) and greedy answers
    routing     expert-load statistics, routing shift between models, per-token routing of sample texts
    results     report.html and the plots from the results, and the same to W&B
    report      the plots and the self-contained HTML report
"""
