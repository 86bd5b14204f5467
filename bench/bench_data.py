"""Data prep throughput: encode + mask + pack synthetic conversations, ours vs TRL's SFTTrainer.

    make bench-data                                   # 100k conversations, 1 and 2 processes
    python bench/bench_data.py --n 20000 --procs 1    # a quicker run

Ours: data_prep's validate + Mixtral v1 encode (batched SentencePiece calls) + label mask +
best-fit-decreasing packing, the same functions `python -m pipeline.prep` runs.
TRL: `SFTTrainer._prepare_dataset` (chat template -> tokenize with assistant masks -> labels ->
BFD packing) on a `datasets.Dataset` of the same conversations, with a fast HF tokenizer built
from the same SentencePiece model (shared/FORMATS.md section 1 recipe) and a v1-style chat
template with {% generation %} markers. Both produce input_ids + labels packed into rows of
--max-len tokens. The "same ids" column counts conversations (first 1000) whose TRL ids equal ours.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import random
import tempfile
import time
import warnings

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{% generation %}{{ ' ' + m['content'] + eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
)
WORDS = "the a of to and in is it you that he was for on are with as I his they be at one have this from".split()
WORDS += "data model token train expert router layer answer question code print def return 12 345 6789".split()


def synthetic_conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    out = []
    for _ in range(n):
        messages = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            messages += [{"role": "user", "content": text(5, 60)}, {"role": "assistant", "content": text(5, 150)}]
        out.append({"messages": messages})
    return out


def hf_tokenizer(sp_path: str):
    """A fast tokenizer equal to the SentencePiece model (FORMATS.md section 1)."""
    import sentencepiece
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_path)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, vocab_scores=scores)
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.pad_token = "</s>"
    fast.chat_template = CHAT_TEMPLATE
    return fast


def run_ours(records: list[dict], max_len: int, procs: int) -> tuple[float, int, int]:
    from data_prep.config import DataConfig, SourceConfig
    from data_prep.pack import pack
    from data_prep.prepare import _encode_chunk, _encode_in_worker, _init_worker
    from data_prep.tokenizer import load_tokenizer

    cfg = DataConfig(sources=[SourceConfig(path="bench")], max_seq_len=max_len, overlength="truncate")
    start = time.perf_counter()
    tok = load_tokenizer()
    jobs = [(cfg, "bench", "messages", [(str(i), r) for i, r in enumerate(records[s : s + 1000], s)])
            for s in range(0, len(records), 1000)]
    if procs > 1:
        with multiprocessing.get_context("fork").Pool(procs, initializer=_init_worker, initargs=(tok,)) as pool:
            results = pool.map(_encode_in_worker, jobs, chunksize=4)
    else:
        results = [_encode_chunk(job, tok) for job in jobs]
    examples = [e for r in results for e in r.examples]
    rows = pack(examples, max_len)
    seconds = time.perf_counter() - start
    return seconds, sum(len(e["input_ids"]) for e in examples), len(rows["input_ids"])


def run_trl(records: list[dict], max_len: int, procs: int, tok) -> tuple[float, int, int]:
    import datasets
    from transformers import MixtralConfig, MixtralForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = MixtralForCausalLM(MixtralConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_length=max_len, packing=True, packing_strategy="bfd",
                         assistant_only_loss=True, dataset_num_proc=procs if procs > 1 else None,
                         report_to="none", use_cpu=True)
        small = datasets.Dataset.from_list(records[:8])
        trainer = SFTTrainer(model=model, args=args, train_dataset=small, processing_class=tok)
        dataset = datasets.Dataset.from_list(records)
        datasets.disable_caching()
        start = time.perf_counter()
        packed = trainer._prepare_dataset(dataset, tok, args, True, None, "bench")
        seconds = time.perf_counter() - start
    tokens = int(sum(sum(x) for x in packed["seq_lengths"])) if "seq_lengths" in packed.column_names else 0
    return seconds, tokens, len(packed)


def same_ids(records: list[dict], tok, k: int = 1000) -> str:
    from data_prep import encode_messages, load_tokenizer

    ours = load_tokenizer()
    equal = 0
    for r in records[:k]:
        theirs = tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]
        equal += theirs == encode_messages(r["messages"], ours)["input_ids"]
    return f"{equal}/{k}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="conversations")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    from data_prep import default_tokenizer_path

    records = synthetic_conversations(args.n)
    tok = hf_tokenizer(str(default_tokenizer_path()))
    print(f"{args.n} synthetic conversations (1-3 turns), rows of {args.max_len} tokens, "
          f"{multiprocessing.cpu_count()} CPU cores; TRL ids equal ours on {same_ids(records, tok)} conversations")
    print(f"{'impl':<8}{'procs':>6}{'seconds':>10}{'conv/s':>12}{'tokens/s':>14}{'rows':>9}{'vs TRL':>9}")
    for procs in args.procs:
        s_ours, tokens, rows = run_ours(records, args.max_len, procs)
        line = [("ours", procs, s_ours, tokens, rows)]
        if not args.skip_trl:
            s_trl, t_trl, r_trl = run_trl(records, args.max_len, procs, tok)
            line.append(("trl", procs, s_trl, t_trl or tokens, r_trl))
        for impl, p, s, t, r in line:
            ratio = f"{line[1][2] / s:.2f}x" if len(line) > 1 else "-"
            print(f"{impl:<8}{p:>6}{s:>10.2f}{args.n / s:>12,.0f}{t / s:>14,.0f}{r:>9}{ratio:>9}")


if __name__ == "__main__":
    main()
