"""Parallelism applied to a built model from outside: nothing in model/ knows about processes.

    parallel         the recipe's parallel section, accelerate + DeepSpeed set-up, ZeRO-3 gathers,
                     the final consolidated state dict, shared-directory checks
    expert_parallel  expert placement (which rank holds which experts) and the all-to-all dispatch
    comm             collectives on the device the process group communicates on (cuda for NCCL)
    sharded_load     each rank loads only its share of the checkpoint (EP experts, ZeRO-3 partitions)
"""
