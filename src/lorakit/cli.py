"""`lorakit VERB ...`: each verb parses its arguments and calls one function of the Python API."""

import argparse
import sys
from pathlib import Path

import lorakit
from lorakit import api, console


def _init(args) -> None:
    lorakit.init(args.dir)


def _check(args) -> None:
    if Path(args.config).suffix in (".yaml", ".yml"):
        cfg = lorakit.load_config(args.config, args.overrides)
    else:  # a data file, glob or save_to_disk directory, checked with --model's tokenizer and template
        cfg = lorakit.load_config(overrides=[f"data.train={args.config}", f"model={args.model}", *args.overrides])
    lorakit.check(cfg, dump_tokens=args.dump_tokens)


def _train(args) -> None:
    cfg = lorakit.load_config(args.config, args.overrides)  # a bad config fails here, once
    if args.nproc == 1:
        lorakit.train(cfg, resume=args.resume, force=args.force)
    else:
        api.train_processes(args.config, args.overrides, args.nproc, resume=args.resume, force=args.force)


def _plan(args) -> None:
    api.plan(lorakit.load_config(args.config, args.overrides), gpu_mem=args.gpu_mem, gpu=args.gpu,
             as_json=args.json)


def _eval(args) -> None:
    lorakit.evaluate(args.run_dir, prompts=args.prompts, limit=args.limit)


def _merge(args) -> None:
    api.merge(args.run_dir, args.out, args.dtype)


def _export(args) -> None:
    if not args.gguf:
        raise lorakit.LorakitError("export: name the format, --gguf (the only one so far); "
                                   "for a Hugging Face model use: lorakit merge RUN_DIR --out DIR")
    api.export_gguf(args.run_dir, args.out, args.quant)


def _chat(args) -> None:
    api.chat(args.target, args.max_new_tokens)


def _serve(args) -> None:
    api.serve(args.target, args.host, args.port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Fine-tune small language models with LoRA and QLoRA.")
    parser.add_argument("--version", action="version", version=f"lorakit {lorakit.__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("init", help="write a starter config and a small data file that trains as-is")
    p.add_argument("dir", nargs="?", default=".")
    p.set_defaults(run=_init)

    p = verbs.add_parser("check", help="read, render and verify the data; print the report")
    p.add_argument("config", help="YAML config file, or a data file / glob / save_to_disk directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.max_length=2048")
    p.add_argument("--model", default="smollm2-135m", help="with a data file: whose tokenizer and chat template")
    p.add_argument("--dump-tokens", metavar="FILE", help="write each example's input_ids and labels as JSON lines")
    p.set_defaults(run=_check)

    p = verbs.add_parser("train", help="train an adapter, then evaluate it")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=20")
    p.set_defaults(run=_train)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--force", action="store_true", help="with --resume: accept a changed config, data or model")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train in N processes on this machine (one per GPU; on CPU, gloo)")

    p = verbs.add_parser("plan", help="will it fit, how fast, what to change: lora vs qlora x checkpointing")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.max_length=4096")
    p.add_argument("--gpu-mem", metavar="SIZE", help="plan for a GPU with this much memory, e.g. 24GiB")
    p.add_argument("--gpu", metavar="NAME", help="plan for a GPU family, e.g. A100, H100, RTX 4090")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=_plan)

    p = verbs.add_parser("eval", help="base vs tuned on held-out prompts")
    p.add_argument("run_dir")
    p.add_argument("--prompts", help="file of held-out conversations (default: data.eval of the run)")
    p.add_argument("--limit", type=int, help="evaluate at most N prompts")
    p.set_defaults(run=_eval)

    p = verbs.add_parser("merge", help="fold the adapter into its base; save a standalone model")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--dtype", default="bf16", help="bf16 (default) or fp32")
    p.set_defaults(run=_merge)

    p = verbs.add_parser("export", help="write a GGUF file for llama.cpp and Ollama, with a Modelfile")
    p.add_argument("run_dir")
    p.add_argument("--gguf", action="store_true", help="GGUF format (llama.cpp, Ollama)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--quant", default="f16", help="f16 (default), bf16 or q8_0")
    p.set_defaults(run=_export)

    p = verbs.add_parser("chat", help="chat in the terminal (one answer when stdin is a pipe)")
    p.add_argument("target", metavar="RUN_DIR|MODEL", help="a run directory, a merged model or a model name")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.set_defaults(run=_chat)

    p = verbs.add_parser("serve", help="OpenAI-compatible endpoint: /v1/chat/completions, /v1/models")
    p.add_argument("target", metavar="RUN_DIR|MODEL", help="a run directory, a merged model or a model name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console.quiet_libraries()
    try:
        args.run(args)
    except lorakit.LorakitError as e:
        console.error(str(e))
        return e.exit_code
    except (lorakit.Interrupted, KeyboardInterrupt) as e:
        console.warn(str(e) or "interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
