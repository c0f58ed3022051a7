"""``python -m minitrain <command> ...``.

Each subcommand is one function decorated with ``@command(name, help)``: it receives its own
``argparse`` parser to fill and returns the function that runs the parsed arguments. Adding a
subcommand is adding one such function (here or in a module imported here).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

COMMANDS: dict[str, tuple[str, Callable]] = {}


def command(name: str, help: str):
    def register(setup: Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]):
        COMMANDS[name] = (help, setup)
        return setup
    return register


_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16", "fp64": "float64", "float64": "float64"}


_BITS = (4, 8, "nf4")  # quantize / generate --bits


def _bits(value: str):
    return value if value == "nf4" else int(value)


def _dtype(name):
    import torch

    return None if name is None else getattr(torch, _DTYPES[name])


_POS_EMB_HELP = ("position encoding of an HF directory: rope (Baichuan2-7B) | alibi (Baichuan2-13B). Default: "
                 "decided from the directory's evidence (config.json pos_emb, modeling_baichuan.py, rotary keys, "
                 "released shapes); an error when it conflicts or is missing")


def _add_pos_emb(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pos-emb", choices=("rope", "alibi"), default=None, help=_POS_EMB_HELP)


def _load_model_or_exit(src, **kwargs):
    """:func:`minitrain.hf.load_model`, or (None, 2) after printing a one-line error for an unknown or
    contradicted position encoding (no traceback: the message says what to pass)."""
    from .hf import PositionEncodingError, load_model

    try:
        return load_model(src, **kwargs), 0
    except PositionEncodingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None, 2


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (main() may run many times in one process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _setup_logging() -> None:
    """INFO lines of the ``minitrain`` loggers (e.g. ``minitrain.hf: position encoding: ...``) on stderr."""
    log = logging.getLogger("minitrain")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


@command("generate", "generate text from an HF Baichuan 2 directory or a minitrain model file")
def _generate(p: argparse.ArgumentParser):
    p.add_argument("model", help="HF-format directory (config.json + weights), a minitrain .pt model file or a "
                                 "quantized model file (from `quantize`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help="prompt as token ids, e.g. '1 195 9381 196'")
    src.add_argument("--prompt", help="prompt text (needs --tokenizer)")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default: MODEL/tokenizer.model)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling, no repetition penalty)")
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--repetition-penalty", type=float, default=1.05)
    p.add_argument("--no-eos-stop", action="store_true", help="keep going past eos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default: the checkpoint's dtype")
    p.add_argument("--backend", default=None, help="kernel backend for every op (default: the config's, 'auto')")
    p.add_argument("--bits", type=_bits, choices=_BITS,
                   help="quantize the projections on load (weight-only int4/int8/NF4)")
    p.add_argument("--group-size", type=int, default=128, help="int4/NF4 group size with --bits 4|nf4 (32, 64 or 128)")
    _add_pos_emb(p)

    def run(args) -> int:
        import os

        import torch

        from .generate import GenerationConfig, TokenMeter, generate
        from .hf import PositionEncodingError, check_pos_emb_matches
        from .nf4 import is_bnb_nf4_checkpoint, load_bnb_nf4_checkpoint
        from .quantized import is_quantized_file, load_quantized_model, quantize

        if is_quantized_file(args.model):
            if args.bits is not None:
                print(f"error: {args.model} is already quantized; drop --bits", file=sys.stderr)
                return 2
            model = load_quantized_model(args.model, dtype=_dtype(args.dtype), device=args.device,
                                         backend=args.backend)
            try:
                check_pos_emb_matches(args.pos_emb, model.config, args.model)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        elif is_bnb_nf4_checkpoint(args.model):  # a released *-4bits directory (bitsandbytes NF4)
            if args.bits is not None:
                print(f"error: {args.model} is already NF4-quantized; drop --bits", file=sys.stderr)
                return 2
            try:
                model = load_bnb_nf4_checkpoint(args.model, dtype=_dtype(args.dtype), device=args.device,
                                                backend=args.backend, pos_emb=args.pos_emb)
            except PositionEncodingError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        else:
            model, rc = _load_model_or_exit(args.model, dtype=_dtype(args.dtype), device=args.device,
                                            backend=args.backend, pos_emb=args.pos_emb)
            if model is None:
                return rc
            if args.bits is not None:
                try:
                    quantize(model, args.bits, args.group_size)
                except ValueError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
        sp = None
        if args.prompt is not None:
            tok = args.tokenizer or os.path.join(args.model, "tokenizer.model")
            try:
                import sentencepiece
            except ImportError:
                print("error: --prompt needs the sentencepiece package (or pass --prompt-ids)", file=sys.stderr)
                return 2
            sp = sentencepiece.SentencePieceProcessor(model_file=tok)
            prompt = sp.encode(args.prompt)
        else:
            prompt = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        cfg = GenerationConfig(
            max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, repetition_penalty=1.0 if args.greedy else args.repetition_penalty,
            eos_token_id=None if args.no_eos_stop else model.config.eos_token_id)
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        out: list[int] = []

        def on_token(_row: int, token: int) -> None:
            if sp is None:
                print(token, end=" ", flush=True)
            else:  # print the text grown by this token (pieces can merge across tokens)
                before = sp.decode(out)
                out.append(token)
                print(sp.decode(out)[len(before):], end="", flush=True)

        meter = TokenMeter(model.lm_head.weight.device)
        generate(model, [prompt], cfg, generator=gen, on_token=meter.wrap(on_token))
        print()
        print(meter.report(), file=sys.stderr)
        return 0

    return run


@command("convert", "convert between an HF Baichuan 2 directory and a minitrain model file")
def _convert(p: argparse.ArgumentParser):
    p.add_argument("src", help="HF directory or minitrain .pt model file")
    p.add_argument("dst", help="output: a directory when writing HF format, else a .pt file")
    p.add_argument("--to", choices=("hf", "minitrain"), help="default: the other format than src")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default: keep the source dtype")
    p.add_argument("--bin", action="store_true", help="HF output as pytorch_model*.bin instead of safetensors")
    p.add_argument("--max-shard-size", type=float, default=None, help="HF output shard size in GB (default: one file)")
    _add_pos_emb(p)

    def run(args) -> int:
        from pathlib import Path

        from .hf import save_checkpoint, save_hf_checkpoint

        to = args.to or ("minitrain" if Path(args.src).is_dir() else "hf")
        model, rc = _load_model_or_exit(args.src, dtype=_dtype(args.dtype), pos_emb=args.pos_emb)
        if model is None:
            return rc
        if to == "hf":
            shard = None if args.max_shard_size is None else int(args.max_shard_size * 1e9)
            save_hf_checkpoint(model, args.dst, safetensors=not args.bin, max_shard_size=shard)
        else:
            save_checkpoint(model, args.dst)
        print(f"wrote {to} checkpoint {args.dst} ({model.num_parameters():,} parameters)")
        return 0

    return run


@command("quantize", "quantize a model's projections (weight-only int4/int8) into one quantized model file")
def _quantize(p: argparse.ArgumentParser):
    p.add_argument("src", help="HF directory or minitrain .pt model file")
    p.add_argument("out", help="output quantized model file (safetensors + metadata; e.g. model-int4.safetensors)")
    p.add_argument("--bits", type=_bits, required=True, choices=_BITS,
                   help="4: int4 groups along K; 8: int8 per channel; nf4: NF4 absmax blocks along K")
    p.add_argument("--group-size", type=int, default=128,
                   help="int4/NF4 group size (32, 64 or 128; ignored for 8 bits)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="dtype of the unquantized tensors (default: the source's)")
    p.add_argument("--device", default="cpu", help="where to quantize (e.g. cuda; the file is written from CPU)")
    _add_pos_emb(p)

    def run(args) -> int:
        from .quantized import quantize, save_quantized_model

        model, rc = _load_model_or_exit(args.src, dtype=_dtype(args.dtype), device=args.device, pos_emb=args.pos_emb)
        if model is None:
            return rc
        try:
            quantize(model, args.bits, args.group_size)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        save_quantized_model(model, args.out)
        gs = f", group size {args.group_size}" if args.bits != 8 else ""
        kind = "NF4" if args.bits == "nf4" else f"{args.bits}-bit"
        print(f"wrote {kind} quantized model {args.out} ({kind} projections{gs})")
        return 0

    return run


@command("train", "train a model (default: tiny-rope on the Python standard library, a few minutes on a CPU)")
def _train(p: argparse.ArgumentParser):
    from .train_config import add_arguments, config_from_args

    add_arguments(p)

    def run(args) -> int:
        from .checkpoint import CheckpointError
        from .data import DataError
        from .distributed import finish, shutdown_distributed
        from .train import BadStepError, train

        try:
            cfg = config_from_args(args)
        except (ValueError, FileNotFoundError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            train(cfg)
        except (BadStepError, CheckpointError, DataError) as exc:  # a clear message, no traceback
            print(f"error: {exc}", file=sys.stderr)
            # a failed rank must not wait in a barrier for the others
            return finish(3 if isinstance(exc, BadStepError) else 2, sync=False)
        except BaseException:
            shutdown_distributed(sync=False)  # a failed rank must not wait in a barrier for the others
            raise
        return finish(0)  # a torchrun worker ends here, skipping finalization (gloo's threads can abort it)

    return run


@command("bench-model", "time training steps of a preset (GPU: 7b/13b, reduced layers; CPU: a tiny preset)")
def _bench_model(p: argparse.ArgumentParser):
    p.add_argument("--preset", default="7b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: all that fit, see bench.py)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--ac", default="none", choices=("none", "full", "selective", "op"),
                   help="activation checkpointing: every layer, every 2nd layer, or op-level (save matmuls + attention)")
    p.add_argument("--compile", action="store_true", help="torch.compile every decoder layer (fullgraph=True)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the result to this JSON file")

    def run(args) -> int:
        from .bench import bench_model

        bench_model(args)
        return 0

    return run


@command("bench-decode", "time decode steps (tokens/s) of a preset at batch sizes, bf16 or quantized (few layers)")
def _bench_decode(p: argparse.ArgumentParser):
    p.add_argument("--preset", default="7b")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--bits", nargs="+", type=lambda v: v if v in ("bf16", "nf4") else int(v),
                   choices=("bf16", 4, 8, "nf4"), default=["bf16", 4, 8, "nf4"],
                   help="bf16 and/or quantized projections (4, 8, nf4)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per row (prefilled, not timed)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="CPU only (a GPU always runs bf16)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the result to this JSON file")

    def run(args) -> int:
        from .bench_decode import bench_decode

        bench_decode(args)
        return 0

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minitrain", description="minitrain: Baichuan 2 on baichuan_kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, setup) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(run=setup(p))
    args = parser.parse_args(argv)
    _setup_logging()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
