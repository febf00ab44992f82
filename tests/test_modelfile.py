"""The Ollama Modelfile: its TEMPLATE, run by a small interpreter of the Go template subset lorapipe writes, renders a
conversation exactly as the tokenizer's own chat template does (tiny model, Qwen 2.5, Llama 3, Llama 3.1); an
unknown or unexpected template gets no TEMPLATE at all."""

import re
from pathlib import Path

import pytest

from lorapipe.data.end_tokens import end_tokens
from lorapipe.export.modelfile import (
    CHATML,
    LLAMA3,
    detect_family,
    ollama_modelfile,
    write_modelfile,
)

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

WITH_SYSTEM = [{"role": "system", "content": "You answer in one sentence."},
               {"role": "user", "content": "What is WWDC?"},
               {"role": "assistant", "content": "Apple's developer conference."},
               {"role": "user", "content": "When is it held?"}]
WITHOUT_SYSTEM = WITH_SYSTEM[1:]


# -- a small interpreter of Go's text/template, the subset the Modelfile uses ---------------------------------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|-?\d+|\$?[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*|\$(?:\.[A-Za-z_]\w*)*|'
                    r'\.(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)?)')


def _parse(template: str) -> list:
    """Text and actions -> nested nodes: ("text", s), ("out", expr), ("set", var, expr),
    ("if", [(cond, body), ...], else_body), ("range", (index_var, elem_var), expr, body)."""
    pieces, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):  # {{- trims the whitespace before the action
            text = text.rstrip()
        if pieces and pieces[-1][0] == "trim_next":
            pieces.pop()
            text = text.lstrip()
        pieces.append(("text", text))
        pieces.append(("action", m.group(2)))
        if m.group(3):
            pieces.append(("trim_next", None))
        pos = m.end()
    tail = template[pos:]
    if pieces and pieces[-1][0] == "trim_next":
        pieces.pop()
        tail = tail.lstrip()
    pieces.append(("text", tail))

    def block(i: int, stop: tuple) -> tuple[list, int, str]:
        nodes = []
        while i < len(pieces):
            kind, value = pieces[i]
            i += 1
            if kind == "text":
                nodes.append(("text", value))
                continue
            word = value.split(" ", 1)[0]
            if word in stop or value.startswith("else"):
                return nodes, i, value
            if word == "if":
                branches, cond = [], value[3:]
                while True:
                    body, i, ended = block(i, ("end",))
                    branches.append((cond, body))
                    if ended.startswith("else if "):
                        cond = ended[len("else if "):]
                        continue
                    if ended == "else":
                        else_body, i, _ = block(i, ("end",))
                        nodes.append(("if", branches, else_body))
                    else:
                        nodes.append(("if", branches, []))
                    break
            elif word == "range":
                head = value[len("range "):]
                names: tuple = ()
                if ":=" in head:
                    left, head = head.split(":=", 1)
                    names = tuple(n.strip() for n in left.split(","))
                body, i, _ = block(i, ("end",))
                nodes.append(("range", names, head.strip(), body))
            elif re.match(r"\$\w+\s*:=", value):
                var, expr = value.split(":=", 1)
                nodes.append(("set", var.strip(), expr.strip()))
            else:
                nodes.append(("out", value))
        return nodes, i, ""

    nodes, _, _ = block(0, ())
    return nodes


def _truthy(value) -> bool:
    return bool(value)  # Go: false, 0, nil, "" and empty collections are false, as in Python


def _eval(expr: str, dot, scope: dict):
    tokens = [t for t in _TOKEN.findall(expr) if t]

    def operand(tok):
        if tok.startswith('"'):
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        if tok.startswith("$"):
            name, _, path = tok.partition(".")
            value = scope["$"] if name == "$" else scope[name]
        elif tok.startswith("."):
            value, path = dot, tok[1:]
        else:
            raise ValueError(f"unknown operand {tok}")
        for field in filter(None, path.split(".")):
            value = value[field]
        return value

    functions = {
        "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truthy(a),
        "len": len, "slice": lambda s, i=0, j=None: s[i:j],
        "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
        "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
    }

    def command(i: int, end: str) -> tuple:
        args = []
        while i < len(tokens) and tokens[i] != end:
            if tokens[i] == "(":
                value, i = command(i + 1, ")")
                args.append(("value", value))
                i += 1
            else:
                args.append(("token", tokens[i]))
                i += 1
        if args and args[0][0] == "token" and args[0][1] in functions:
            values = [v if k == "value" else operand(v) for k, v in args[1:]]
            return functions[args[0][1]](*values), i
        assert len(args) == 1, f"not a single operand: {expr}"
        kind, v = args[0]
        return (v if kind == "value" else operand(v)), i

    return command(0, "")[0]


def _run(nodes: list, dot, scope: dict, out: list) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            out.append(str(_eval(node[1], dot, scope)))
        elif kind == "set":
            scope[node[1]] = _eval(node[2], dot, scope)
        elif kind == "if":
            for cond, body in node[1]:
                if _truthy(_eval(cond, dot, scope)):
                    _run(body, dot, scope, out)
                    break
            else:
                _run(node[2], dot, scope, out)
        elif kind == "range":
            for index, elem in enumerate(_eval(node[2], dot, scope)):
                inner = dict(scope)  # variables declared in the body end with the iteration
                if len(node[1]) == 2:
                    inner[node[1][0]], inner[node[1][1]] = index, elem
                elif len(node[1]) == 1:
                    inner[node[1][0]] = elem
                _run(node[3], elem, inner, out)


def render_go(template: str, messages: list[dict]) -> str:
    """What Ollama hands its template: every message (system ones included) as .Messages, the system messages joined
    as .System."""
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            "System": "\n\n".join(m["content"] for m in messages if m["role"] == "system")}
    out: list = []
    _run(_parse(template), data, {"$": data}, out)
    return "".join(out)


def test_the_interpreter_follows_go_semantics_on_a_known_template():
    """Ollama's documented ChatML example: range over .Messages, then the generation prompt."""
    template = ("{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                "<|im_start|>assistant\n")
    assert render_go(template, WITHOUT_SYSTEM[:1]) == ("<|im_start|>user\nWhat is WWDC?<|im_end|>\n"
                                                       "<|im_start|>assistant\n")
    assert render_go("{{- if .System -}} S {{- end }}", WITH_SYSTEM) == "S"
    assert render_go("{{ if .System }} S {{- end }}", WITHOUT_SYSTEM + WITH_SYSTEM[:1]) == " S"
    assert render_go('{{ if and (eq 1 1) (ne "a" "b") }}yes{{ else }}no{{ end }}', []) == "yes"


# -- tokenizers of each family, built from the tiny one --------------------------------------------------------------

def _tokenizer(tiny_model_dir, template_file=None, specials=(), **tokens):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    if specials:
        tok.add_tokens(list(specials), special_tokens=True)
    if tokens:
        tok.add_special_tokens(tokens)
    if template_file:
        tok.chat_template = (TEMPLATES / template_file).read_text(encoding="utf-8")
    return tok


LLAMA3_TOKENS = dict(specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>",
                               "<|end_of_text|>"),
                     bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
CASES = {
    "tiny": dict(),
    "qwen2.5": dict(template_file="qwen2.5-instruct.jinja", eos_token="<|im_end|>"),
    "llama-3": dict(template_file="llama-3-instruct.jinja", **LLAMA3_TOKENS),
    "llama-3.1": dict(template_file="llama-3.1-instruct.jinja", **LLAMA3_TOKENS),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("conversation", [WITH_SYSTEM, WITHOUT_SYSTEM], ids=["with-system", "without-system"])
def test_the_template_renders_like_the_chat_template(tiny_model_dir, case, conversation):
    tok = _tokenizer(tiny_model_dir, **CASES[case])
    modelfile = ollama_modelfile(tok, end_tokens(tok))
    assert modelfile.template is not None, modelfile.note
    assert f'TEMPLATE """{modelfile.template}"""' in modelfile.text
    expected = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    rendered = render_go(modelfile.template, conversation)
    if case.startswith("llama"):  # the BOS is the runtime's (it adds it when it tokenizes), said in a comment
        assert expected == tok.bos_token + rendered
        assert "the BOS token <|begin_of_text|> is left to the runtime" in modelfile.text
    else:
        assert expected == rendered


def test_families_and_stop_tokens(tiny_model_dir):
    tiny = _tokenizer(tiny_model_dir)
    llama = _tokenizer(tiny_model_dir, **CASES["llama-3"])
    assert detect_family(tiny.chat_template) is CHATML and detect_family(llama.chat_template) is LLAMA3
    tiny_file = ollama_modelfile(tiny, end_tokens(tiny)).text
    assert tiny_file.count("PARAMETER stop") == 1 and 'PARAMETER stop "<|im_end|>"' in tiny_file
    assert "\nFROM .\n" in tiny_file and "ChatML" in tiny_file
    # Llama 3's EOS (<|end_of_text|>) and its turn end (<|eot_id|>) both stop generation
    llama_file = ollama_modelfile(llama, end_tokens(llama)).text
    stops = re.findall(r'^PARAMETER stop "(.*)"$', llama_file, flags=re.M)
    assert stops == ["<|end_of_text|>", "<|eot_id|>"]


def test_an_unknown_family_gets_no_template_and_says_why(tiny_model_dir, tmp_path):
    from lorapipe.data.render import FALLBACK_CHAT_TEMPLATE

    tok = _tokenizer(tiny_model_dir)
    tok.chat_template = FALLBACK_CHAT_TEMPLATE  # "### Instruction:" blocks: not a family lorapipe translates
    modelfile = write_modelfile(tmp_path, tok, end_tokens(tok))
    text = (tmp_path / "Modelfile").read_text()
    assert modelfile.template is None and modelfile.family is None
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "")
    assert "# No TEMPLATE: the chat template is neither ChatML nor Llama 3" in text
    assert "\nFROM .\n" in text and 'PARAMETER stop "<|im_end|>"' in text


def test_a_family_template_with_another_layout_is_not_translated(tiny_model_dir):
    """ChatML's tokens with a blank line after the role: translating it as ChatML would be wrong, so nothing is."""
    tok = _tokenizer(tiny_model_dir)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}")
    modelfile = ollama_modelfile(tok, end_tokens(tok))
    assert modelfile.template is None and "does not follow the family's layout" in modelfile.note
    assert "# No TEMPLATE" in modelfile.text


def test_the_modelfile_says_it_leaves_tools_out_only_where_the_template_has_them(tiny_model_dir):
    """Qwen2.5's template renders tool definitions and calls, which the Ollama TEMPLATE does not carry: said, with
    where to serve tool calling instead; the tiny ChatML template has no tools, and nothing is said about them."""
    with_tools = _tokenizer(tiny_model_dir, **CASES["qwen2.5"])
    note = ollama_modelfile(with_tools, end_tokens(with_tools)).note
    assert "renders tool definitions and tool calls, which this TEMPLATE does not carry" in note
    plain = _tokenizer(tiny_model_dir)
    assert "tool" not in ollama_modelfile(plain, end_tokens(plain)).note
