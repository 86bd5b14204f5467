"""What pipeline.eval measures and writes, apart from the stage's order.

    passkey  the passkey retrieval grid (context length x depth)
    routing  expert-load statistics and per-token routing of sample texts
    report   the plots and the self-contained HTML report
"""
