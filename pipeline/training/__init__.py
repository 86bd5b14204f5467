"""Training infrastructure shared by the training stages (pipeline.sft, pipeline.dpo).

    trainer        the loop: global-batch loss normalisation, accumulation, eval, checkpoints, logging
    optim          AdamW groups (no decay on norms/biases), warmup + cosine schedule, CPU Adam choice
    checkpointing  atomic, pickle-free checkpoints that resume to the same loss trajectory
    tracking       W&B / JSONL metrics, redacted config, one run per stage across resumes
    batches        token rows and preference pairs -> model batch (the batch contract: document id -1 = padding)
    tasks          the trainer's Task per stage: SFTTask, DPOTask (+ its on-the-fly Reference)
    reference_cache  DPO reference log-probs computed once and cached next to the dataset
    model_setup    build the stage's model (checkpoint, preset, 4-bit base, LoRA) and save the result
    lora_init      LoRA A drawn the same whatever the expert placement (ep=N trains what ep=1 trains)
    dpo_loss       preference losses (sigmoid, robust, hinge, IPO) on summed completion log-probs
"""
