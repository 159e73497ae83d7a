"""The Ollama Modelfile written next to a GGUF: FROM the file, TEMPLATE (a Go template) equivalent to the
run's chat template, SYSTEM for a default system prompt the template adds, PARAMETER stop per end-of-turn.

Go templates cannot be derived from arbitrary Jinja, so each family below holds the pieces of one turn,
from which both the Go template and a Python rendering of it are built. A family is used only when that
rendering equals the run's Jinja template on probe conversations; otherwise the Modelfile has no
TEMPLATE and Ollama falls back to the chat template stored in the GGUF.
"""

from dataclasses import dataclass
from pathlib import Path

import jinja2

from lorakit import console
from lorakit.data.sandbox import render_chat
from lorakit.export.merge import adds_bos


@dataclass(frozen=True)
class Family:
    name: str
    turn: str  # one message, with {role} and {content}
    reply: str  # what opens the assistant's answer

    def render(self, system: str | None, messages: list[dict]) -> str:
        """What the Go template below renders for these messages (system ones go through .System)."""
        head = self.turn.format(role="system", content=system) if system else ""
        body = "".join(self.turn.format(**m) for m in messages if m["role"] != "system")
        return head + body + self.reply

    def go_template(self) -> str:
        system = self.turn.format(role="system", content="{{ .System }}")
        turn = self.turn.format(role="{{ .Role }}", content="{{ .Content }}")
        return (f"{{{{ if .System }}}}{system}{{{{ end }}}}"
                f'{{{{ range .Messages }}}}{{{{ if ne .Role "system" }}}}{turn}{{{{ end }}}}{{{{ end }}}}'
                f"{self.reply}")

    def default_system(self, rendered: str) -> str | None:
        """The system text at the head of `rendered`, a conversation given without one."""
        opening, closing = self.turn.format(role="system", content="\0").split("\0")
        if not rendered.startswith(opening) or closing not in rendered[len(opening):]:
            return None
        return rendered[len(opening):].split(closing, 1)[0]


FAMILIES = [
    Family("chatml", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n"),
    Family("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
           "<|start_header_id|>assistant<|end_header_id|>\n\n"),
]

_SYSTEM = {"role": "system", "content": "Be brief."}
_TALK = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "What is 2 + 2?"}]


def match_family(tokenizer) -> tuple[Family, str | None] | None:
    """The family whose rendering equals the tokenizer's chat template, and the default system prompt
    the template adds when a conversation has none; None when no family matches."""
    def jinja(messages):
        text = render_chat(tokenizer, messages, None, add_generation_prompt=True)
        bos = tokenizer.bos_token
        # llama.cpp adds BOS itself when the tokenizer does (add_bos_token in the GGUF); Ollama's
        # template must then leave it out.
        if bos and adds_bos(tokenizer) and text.startswith(bos):
            text = text[len(bos):]
        return text

    try:
        with_system, alone = jinja([_SYSTEM, *_TALK]), jinja(_TALK)
    except jinja2.TemplateError:  # a template that refuses a system message is none of ours
        return None
    for family in FAMILIES:
        if with_system != family.render(_SYSTEM["content"], _TALK):
            continue
        default = family.default_system(alone) if alone != family.render(None, _TALK) else None
        if alone == family.render(default, _TALK):
            return family, default
    return None


def modelfile_text(tokenizer, gguf_name: str, stop_ids: list[int]) -> str:
    lines = [f"# Written by lorakit. Create the model with: ollama create NAME -f {Path(gguf_name).stem}.Modelfile",
             f"FROM ./{gguf_name}"]
    matched = match_family(tokenizer)
    if matched is None:
        console.warn("the chat template is neither ChatML nor Llama-3 style: the Modelfile has no TEMPLATE, so "
                     "Ollama uses the template stored in the GGUF; check a reply before relying on it")
    else:
        family, default = matched
        lines.append(f'TEMPLATE """{family.go_template()}"""')
        if default:
            lines.append(f'SYSTEM """{default}"""')
    lines += [f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(i)}"' for i in stop_ids]
    return "\n".join(lines) + "\n"


def write_modelfile(tokenizer, gguf_path: Path, stop_ids: list[int]) -> Path:
    path = gguf_path.with_suffix(".Modelfile")
    path.write_text(modelfile_text(tokenizer, gguf_path.name, stop_ids))
    return path

