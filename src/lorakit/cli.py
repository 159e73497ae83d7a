"""`lorakit VERB ...`: each verb parses its arguments and calls one function of the Python API."""

import argparse
import sys

import lorakit
from lorakit import api, console


def _init(args) -> None:
    lorakit.init(args.dir)


def _check(args) -> None:
    lorakit.check(lorakit.load_config(args.config, args.overrides))


def _train(args) -> None:
    lorakit.train(lorakit.load_config(args.config, args.overrides), resume=args.resume, force=args.force)


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

    for name, fn, text in (("check", _check, "render and check the data; print the report"),
                           ("train", _train, "train an adapter, then evaluate it")):
        p = verbs.add_parser(name, help=text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=20")
        p.set_defaults(run=fn)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--force", action="store_true", help="with --resume: accept a changed config, data or model")

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
