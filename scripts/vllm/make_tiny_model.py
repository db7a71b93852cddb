"""Build a tiny random-weight Llama model that the real vLLM CPU build can serve.

Run with the vLLM venv's interpreter (it has torch, transformers and tokenizers):

    .venv-vllm/bin/python scripts/vllm/make_tiny_model.py [OUTDIR]   # default .cache/tiny-llama
    .venv-vllm/bin/python scripts/vllm/make_tiny_model.py --crash-on-generate OUTDIR

--crash-on-generate builds the same model with 8 attention heads (head_dim 16): vLLM
0.32.0 (CPU) loads it and answers /health 200, but the first generation request gets
HTTP 500 (EngineDeadError) and the whole server then shuts down and exits: a real
"backend dies" case for tests.

Everything is made offline and deterministically (fixed seed, fixed corpus):
  * a ~2000-token byte-level BPE tokenizer trained with `tokenizers` on a fixed,
    sorted list of Python standard-library source files plus a built-in text;
  * a Llama config with hidden_size 128, 2 attention heads (head_dim 64), 1 KV head,
    2 layers, intermediate 256 (head_dim 16 crashes vLLM's CPU attention);
  * random weights from torch.manual_seed(0), saved as float32 safetensors;
  * a simple chat template.
The output text is gibberish but every vLLM API path is real.

If OUTDIR already holds a complete model (marker file with the same spec), nothing is
done. The model is built in a temporary sibling directory and moved into place at the
end, so an interrupted build never leaves a half-written OUTDIR behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTDIR = ".cache/tiny-llama"
MARKER = ".tiny-model-complete"
SEED = 0
VOCAB_SIZE = 2000

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

MODEL_SPEC = {
    "hidden_size": 128,
    "num_attention_heads": 2,  # head_dim 64
    "num_key_value_heads": 1,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}

# A fixed list of stdlib modules (sorted, only those present are used) so that the
# corpus, and so the tokenizer, is the same on every machine with the same Python.
STDLIB_FILES = [
    "argparse.py",
    "ast.py",
    "asyncio/base_events.py",
    "asyncio/streams.py",
    "collections/__init__.py",
    "configparser.py",
    "csv.py",
    "dataclasses.py",
    "datetime.py",
    "difflib.py",
    "email/message.py",
    "enum.py",
    "functools.py",
    "http/client.py",
    "http/server.py",
    "inspect.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "pathlib.py",
    "pickle.py",
    "shutil.py",
    "socket.py",
    "statistics.py",
    "string.py",
    "subprocess.py",
    "tarfile.py",
    "textwrap.py",
    "threading.py",
    "typing.py",
    "unittest/case.py",
    "urllib/parse.py",
    "zipfile.py",
]

BUILTIN_TEXT = """\
The quick brown fox jumps over the lazy dog. Hello, how are you today?
A gateway forwards chat completion requests to a language model server and streams
the answer back, token by token, to the client. The user asks a question, the
assistant answers it. Please summarise the following text in one sentence.
What is the capital of France? Paris is the capital of France.
One, two, three, four, five, six, seven, eight, nine, ten.
"""


CRASH_OVERRIDES = {"num_attention_heads": 8, "head_dim": 16}


def model_spec(crash: bool) -> dict:
    return {**MODEL_SPEC, **(CRASH_OVERRIDES if crash else {})}


def spec_digest(crash: bool = False) -> str:
    blob = json.dumps(
        {
            "model": model_spec(crash),
            "vocab": VOCAB_SIZE,
            "seed": SEED,
            "special": SPECIAL_TOKENS,
            "template": CHAT_TEMPLATE,
            "files": STDLIB_FILES,
            "text": BUILTIN_TEXT,
            "version": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [BUILTIN_TEXT] * 20
    used = 0
    for rel in sorted(STDLIB_FILES):
        p = stdlib / rel
        if p.is_file():
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
            used += 1
    if used == 0:
        raise SystemExit(f"no stdlib source files found under {stdlib}")
    return texts


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MODEL_SPEC["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, crash: bool = False):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **model_spec(crash),
    )
    config.dtype = "float32"
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def is_complete(outdir: Path, crash: bool = False) -> bool:
    m = outdir / MARKER
    return m.is_file() and m.read_text().strip() == spec_digest(crash)


def main(argv: list[str]) -> int:
    args = argv[1:]
    crash = "--crash-on-generate" in args
    args = [a for a in args if a != "--crash-on-generate"]
    if len(args) > 1 or any(a.startswith("-") for a in args):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    out = Path(args[0] if args else DEFAULT_OUTDIR)
    if not out.is_absolute():
        out = Path.cwd() / out
    if is_complete(out, crash):
        print(f"[make_tiny_model] complete model already at {out}; nothing to do")
        return 0

    if (
        out.exists()
        and any(out.iterdir())
        and not ((out / MARKER).exists() or (out / "config.json").exists())
    ):
        print(
            f"[make_tiny_model] refusing to overwrite {out}: not empty and not a model made by this script",
            file=sys.stderr,
        )
        return 1

    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        tokenizer = build_tokenizer()
        t1 = time.monotonic()
        print(f"[make_tiny_model] tokenizer: {len(tokenizer)} tokens in {t1 - t0:.1f}s")
        model = build_model(tokenizer, crash)
        n_params = sum(p.numel() for p in model.parameters())
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        # Keep the chat template in tokenizer_config.json as well (older readers).
        tc = tmp / "tokenizer_config.json"
        cfg = json.loads(tc.read_text())
        if "chat_template" not in cfg and not (tmp / "chat_template.jinja").exists():
            cfg["chat_template"] = CHAT_TEMPLATE
            tc.write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / MARKER).write_text(spec_digest(crash) + "\n")
        if out.exists():
            # An incomplete or outdated build of ours: replace it.
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"[make_tiny_model] {n_params} parameters, saved to {out} in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
