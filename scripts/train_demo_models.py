"""Train the embedded demo models: a tiny Shakespeare target (~7M params) and a distilled draft (~1M).

The pair exists so that `LLM()` works with no download and so speculative decoding has a realistic
target/draft pair to accelerate. Pipeline:

1. A sentencepiece BPE tokenizer (byte fallback, so any input encodes) trained on the first 90% of the
   corpus, or reused with `--tokenizer`.
2. The target (`LlamaForCausalLM`) trained with next-token cross entropy on the first 90%.
3. The draft trained *after* the target by knowledge distillation: KL(target || draft) on the target's
   soft labels plus a little cross entropy, on corpus windows and on text the target itself wrote (the text
   a speculative decoder drafts on), so that the draft's argmax agrees with the target's as often as possible.
4. Evaluation on the last 10%: loss and per-token perplexity of both, a unigram baseline, the greedy
   agreement rate, and the mean acceptance length greedy speculative decoding (k=4) would reach on the
   target's own greedy continuations of validation prompts. Everything goes to `metrics.json`.

Both models are saved as standard Hugging Face directories (bf16 safetensors, sentencepiece tokenizer,
chat template) that `transformers.AutoModelForCausalLM` / `AutoTokenizer` load as they are.

    python scripts/train_demo_models.py --out miniserve/demo_models --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "data" / "tinyshakespeare.txt"
TRAIN_FRACTION = 0.9
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
MAX_POSITIONS = 1024
PROMPT_TOKENS = 33  # prompt length (BOS included) of the continuations the target writes for the draft

# Rendered like a play: a speaker line, the speech, a blank line; the generation prompt opens the
# assistant's speech, which is exactly the context the model saw after every speaker name in training.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] | upper }}:\n{{ message['content'] }}\n\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)

TARGET_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64)  # fmt: skip
DRAFT_SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=64)  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="training text (default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "miniserve" / "demo_models")
    p.add_argument("--tokenizer", type=Path, default=None, help="reuse this sentencepiece model")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=512, help="training window in tokens (BOS included)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=700, help="target training steps (per trial)")
    p.add_argument("--draft-steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--trials", nargs="+", default=["0.25:0.1", "0.4:0.05", "0.4:0"],
                   help="target runs as DROPOUT:BPE_DROPOUT (residual dropout, sentencepiece sampling "
                        "alpha); the one with the best validation loss is kept")  # fmt: skip
    p.add_argument("--segmentations", type=int, default=8, help="tokenizations of the training text per run")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=50, help="target validation interval (keeps the best)")
    p.add_argument("--patience", type=int, default=6, help="stop the target after this many worse evals")
    p.add_argument("--kd-weight", type=float, default=0.8, help="draft loss = w*KL + (1-w)*CE")
    p.add_argument("--kd-samples", type=int, default=512, help="target-written sequences for the draft")
    p.add_argument("--eval-window", type=int, default=512, help="validation window in tokens")
    p.add_argument("--max-eval-tokens", type=int, default=None, help="cap validation tokens (dry runs)")
    p.add_argument("--spec-prompts", type=int, default=64, help="prompts for the acceptance simulation")
    p.add_argument("--sample-chars", type=int, default=25000, help="validation prefix kept in metrics")
    p.add_argument("--eval-only", action="store_true", help="re-evaluate the models already in --out")
    p.add_argument("--draft-only", action="store_true",
                   help="keep the target (and tokenizer) in --out, distill a new draft from it")  # fmt: skip
    p.add_argument("--draft-layers", type=int, default=DRAFT_SHAPE["num_hidden_layers"])
    p.add_argument("--draft-hidden", type=int, default=DRAFT_SHAPE["hidden_size"], help="heads of 64 dims")
    p.add_argument("--draft-intermediate", type=int, default=DRAFT_SHAPE["intermediate_size"])
    p.add_argument("--time-budget", type=float, default=330.0, help="seconds for both training loops")
    args = p.parse_args()
    if args.seq_len <= PROMPT_TOKENS:
        p.error(f"--seq-len must exceed {PROMPT_TOKENS}: the draft also trains on target continuations of such prompts")
    if args.draft_hidden % 64:
        p.error("--draft-hidden must be a multiple of 64 (heads of 64 dimensions)")
    return args


# ----------------------------------------------------------------------------------------- data


def split_corpus(text: str) -> tuple[str, str]:
    """First 90% of characters trains everything (tokenizer too); the last 10% only evaluates."""
    cut = int(len(text) * TRAIN_FRACTION)
    return text[:cut], text[cut:]


def train_tokenizer(train_text: str, vocab_size: int, prefix: Path) -> Path:
    """BPE with byte fallback over whole speeches, so pieces may carry newlines (":\\n" is one token).

    No dummy prefix: text after a newline has no leading space in the corpus, so a prompt such as
    "ROMEO:" tokenizes exactly like a speaker line inside the play.
    """
    speeches = [s + "\n\n" for s in train_text.split("\n\n")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(speeches), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True, unk_id=UNK_ID,
        bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, max_sentence_length=1 << 20, num_threads=2, minloglevel=2,
    )  # fmt: skip
    return prefix.with_suffix(".model")


def training_stream(sp: spm.SentencePieceProcessor, train_text: str, alpha: float, n: int, device: str):
    """The canonical tokenization, plus n-1 sampled ones when alpha > 0 (BPE-dropout, a regularizer).

    On 0.3M training tokens a 7M model memorizes within ~20 epochs; seeing each sentence under a different
    segmentation every epoch delays that, so the target keeps improving on validation for longer.
    """
    streams = [sp.encode(train_text)]
    if alpha > 0:
        speeches = [s + "\n\n" for s in train_text.split("\n\n")]
        for _ in range(n - 1):
            pieces = sp.encode(speeches, enable_sampling=True, alpha=alpha, nbest_size=-1, num_threads=8)
            streams.append([t for speech in pieces for t in speech])
    return torch.tensor([t for s in streams for t in s], dtype=torch.long, device=device)


def line_starts(sp: spm.SentencePieceProcessor, ids: torch.Tensor) -> torch.Tensor:
    """Token positions that begin a line: training windows start there, like real prompts do."""
    ends_line = [sp.id_to_piece(i).endswith("\n") for i in range(sp.get_piece_size())]
    ends_line = torch.tensor(ends_line, device=ids.device)
    return torch.nonzero(ends_line[ids[:-1]]).flatten() + 1


def sample_windows(stream: torch.Tensor, starts: torch.Tensor, batch: int, seq_len: int, gen) -> torch.Tensor:
    """[BOS] + seq_len-1 corpus tokens per row, starting at random line starts."""
    ok = starts[starts <= len(stream) - seq_len]
    pick = ok[torch.randint(len(ok), (batch,), generator=gen, device="cpu").to(ok.device)]
    idx = pick[:, None] + torch.arange(seq_len - 1, device=stream.device)
    bos = torch.full((batch, 1), BOS_ID, dtype=stream.dtype, device=stream.device)
    return torch.cat([bos, stream[idx]], dim=1)


def eval_windows(stream: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Non-overlapping [BOS] + window tokens; every validation token is predicted exactly once."""
    bos = stream.new_tensor([BOS_ID])
    return [torch.cat([bos, stream[i : i + window]]) for i in range(0, len(stream), window)]


# ---------------------------------------------------------------------------------------- models


def make_model(shape: dict, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, rms_norm_eps=1e-5, rope_theta=10000.0, **shape,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def add_residual_dropout(model, p: float) -> list:
    """GPT-2 style dropout on both residual branches; hooks keep the saved architecture plain Llama."""
    hooks = []
    for layer in model.model.layers:
        for mod in (layer.self_attn.o_proj, layer.mlp):
            hooks.append(mod.register_forward_hook(lambda m, i, out: F.dropout(out, p, m.training)))
    return hooks


def lm_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def make_optimizer(model, lr: float, weight_decay: float, device: str):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warmup, cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def autocast(device: str):
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu")


# -------------------------------------------------------------------------------------- training


def train_target(model, stream, starts, val_windows, args, dropout: float, deadline: float) -> dict:
    """Cross entropy with residual dropout; keeps the weights of the best validation loss seen."""
    opt = make_optimizer(model, args.lr, args.weight_decay, args.device)
    gen = torch.Generator().manual_seed(args.seed)
    hooks = add_residual_dropout(model, dropout)
    best = {"val_loss": float("inf"), "step": 0, "state": None}
    t0 = time.time()
    for step in range(args.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        ids = sample_windows(stream, starts, args.batch_size, args.seq_len, gen)
        with autocast(args.device):
            logits = lm_logits(model, ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = step == args.steps - 1 or time.time() > deadline
        if (step + 1) % args.eval_every == 0 or last:
            val = mean_nll(model, val_windows, amp=True)
            if val < best["val_loss"]:
                best = {"val_loss": val, "step": step + 1, "state": clone_state(model)}
            last = last or step + 1 - best["step"] >= args.patience * args.eval_every
            print(f"target step {step + 1:5d} train {loss.item():.4f} val {val:.4f} best "
                  f"{best['val_loss']:.4f}@{best['step']} {time.time() - t0:.0f}s", flush=True)  # fmt: skip
        if last:
            break
    for h in hooks:
        h.remove()
    model.load_state_dict(best["state"])
    return {"steps_run": step + 1, "best_step": best["step"], "val_loss": best["val_loss"],
            "seconds": round(time.time() - t0, 1)}  # fmt: skip


def train_target_trials(sp, train_text, val_windows, vocab, args, deadline: float):
    """One target per DROPOUT:ALPHA trial, each with an equal share of the time; returns the best."""
    best, runs = None, []
    for i, trial in enumerate(args.trials):
        dropout, alpha = (float(x) for x in trial.split(":"))
        spm.set_random_generator_seed(args.seed + i)
        stream = training_stream(sp, train_text, alpha, args.segmentations, args.device)
        torch.manual_seed(args.seed)
        model = make_model(TARGET_SHAPE, vocab).to(args.device)
        share = (deadline - time.time()) / (len(args.trials) - i)
        print(f"target trial dropout={dropout} bpe_dropout={alpha}: {len(stream)} tokens", flush=True)
        run = train_target(model, stream, line_starts(sp, stream), val_windows, args, dropout, time.time() + share)
        runs.append({"dropout": dropout, "bpe_dropout": alpha, **run})
        if best is None or run["val_loss"] < best[1]["val_loss"]:
            best = (model, run)
    return best[0], runs


def clone_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def generate(model, prompts: torch.Tensor, new_tokens: int, temperature: float, gen: torch.Generator):
    """Plain KV-cached decoding (greedy when temperature == 0), independent of generate() defaults."""
    model.eval()
    out = model(input_ids=prompts, use_cache=True)
    seq = [prompts]
    for _ in range(new_tokens):
        logits = out.logits[:, -1].float()
        if temperature == 0:
            tok = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            tok = torch.multinomial(probs.cpu(), 1, generator=gen).to(prompts.device)
        seq.append(tok)
        out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(seq, dim=1)


def target_written_text(target, stream, starts, args, n: int, gen: torch.Generator) -> torch.Tensor:
    """What the draft will draft on: the target's own continuations (half greedy, half sampled)."""
    rows = []
    chunk = 256
    for i in range(0, n, chunk):
        prompts = sample_windows(stream, starts, min(chunk, n - i), PROMPT_TOKENS, gen)
        temperature = 0.0 if (i // chunk) % 2 == 0 else 1.0
        with autocast(args.device):
            rows.append(generate(target, prompts, args.seq_len - PROMPT_TOKENS, temperature, gen))
    return torch.cat(rows)


def train_draft(draft, target, stream, starts, args, deadline: float) -> dict:
    """Distillation: KL to the target's soft labels (plus some CE) on corpus and target-written text."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()
    written = target_written_text(target, stream, starts, args, args.kd_samples, gen)
    print(f"target wrote {written.numel()} tokens for distillation in {time.time() - t0:.0f}s", flush=True)
    opt = make_optimizer(draft, args.draft_lr, 0.0, args.device)
    target.eval()
    for step in range(args.draft_steps):
        draft.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.draft_steps, args.draft_lr)
        half = args.batch_size // 2
        pick = torch.randint(len(written), (args.batch_size - half,), generator=gen).to(written.device)
        ids = torch.cat([sample_windows(stream, starts, half, args.seq_len, gen), written[pick]])
        with torch.no_grad(), autocast(args.device):
            teacher = F.log_softmax(lm_logits(target, ids[:, :-1]), dim=-1).flatten(0, 1)
        with autocast(args.device):
            logits = lm_logits(draft, ids[:, :-1]).flatten(0, 1)
        logp = F.log_softmax(logits, dim=-1)
        kl = F.kl_div(logp, teacher, log_target=True, reduction="batchmean")
        ce = F.nll_loss(logp, ids[:, 1:].flatten())
        loss = args.kd_weight * kl + (1 - args.kd_weight) * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        last = step == args.draft_steps - 1 or time.time() > deadline
        if (step + 1) % 250 == 0 or last:
            print(f"draft step {step + 1:5d} kl {kl.item():.4f} ce {ce.item():.4f} "
                  f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
        if last:
            break
    return {"steps_run": step + 1, "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def mean_nll(model, windows: list[torch.Tensor], amp: bool = False) -> float:
    """Mean next-token NLL (nats) over all tokens after each window's BOS (bf16 autocast if amp)."""
    model.eval()
    device = str(next(model.parameters()).device)
    total, count = 0.0, 0
    for w in windows:
        with autocast(device if amp else "cpu"):
            logits = lm_logits(model, w[None, :-1].to(device))[0]
        total += F.cross_entropy(logits, w[1:].to(device), reduction="sum").item()
        count += len(w) - 1
    return total / count


@torch.no_grad()
def greedy_agreement(target, draft, windows: list[torch.Tensor], device: str) -> float:
    """Share of validation positions where the draft's argmax next token equals the target's."""
    same = count = 0
    for w in windows:
        ids = w[None, :-1].to(device)
        same += (lm_logits(target, ids).argmax(-1) == lm_logits(draft, ids).argmax(-1)).sum().item()
        count += ids.shape[1]
    return same / count


def unigram_nll(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab: int) -> float:
    """Add-one smoothed token frequencies of the training split, scored on the validation tokens."""
    counts = torch.bincount(train_ids.cpu(), minlength=vocab).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return -logp[val_ids.cpu()].mean().item()


@torch.no_grad()
def spec_acceptance(target, draft, stream, starts, args, k: int = 4) -> dict:
    """Mean tokens per target step of greedy speculative decoding with k drafted tokens.

    Under greedy verification the accepted prefix is the target's own greedy text, so the draft's proposal
    j is accepted iff its argmax after the target's greedy prefix equals the target's next token: one
    forward pass of the draft over the target's greedy continuation replays the whole decode.
    """
    gen = torch.Generator().manual_seed(args.seed + 2)
    prompt_len, new = 17, 128
    prompts = sample_windows(stream, starts, args.spec_prompts, prompt_len, gen)
    seq = generate(target, prompts.to(args.device), new, 0.0, gen)
    match = lm_logits(draft, seq[:, :-1])[:, prompt_len - 1 :].argmax(-1) == seq[:, prompt_len:]
    lengths = []
    for row in match.tolist():
        t = 0
        while t < len(row):
            accepted = 0
            while accepted < k and t + accepted < len(row) and row[t + accepted]:
                accepted += 1
            lengths.append(accepted + 1)
            t += accepted + 1
    return {"k": k, "prompts": args.spec_prompts, "new_tokens": new,
            "mean_acceptance_length": sum(lengths) / len(lengths),
            "draft_target_agreement_on_target_greedy_text": match.float().mean().item()}  # fmt: skip


# ---------------------------------------------------------------------------------------- saving


def save_hf_dir(model, tokenizer_model: Path, out: Path) -> None:
    """config.json, bf16 model.safetensors, sentencepiece tokenizer (+ tokenizers JSON), chat template."""
    from transformers import AutoTokenizer, GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.to(torch.bfloat16).save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"  # older readers; transformers 5 writes "dtype"
    cfg["rope_theta"] = 10000.0  # older readers; transformers 5 writes "rope_parameters"
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID).save_pretrained(out)
    shutil.copy(tokenizer_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    # tokenizer.json: the same BPE for readers of the `tokenizers` format, converted by transformers.
    with tempfile.TemporaryDirectory() as tmp:
        AutoTokenizer.from_pretrained(out).save_pretrained(tmp)
        shutil.copy(Path(tmp) / "tokenizer.json", out / "tokenizer.json")


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def check_tokenizer_matches(out: Path, sp: spm.SentencePieceProcessor, texts: list[str]) -> None:
    """transformers must tokenize exactly like sentencepiece (BOS added, no prefix space)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    for text in texts:
        if tok.encode(text) != [BOS_ID] + sp.encode(text):
            raise RuntimeError(f"transformers tokenizer differs from sentencepiece on {text[:60]!r}")
        if tok.decode(tok.encode(text), skip_special_tokens=True) != text:
            raise RuntimeError(f"transformers decode does not round-trip {text[:60]!r}")


def reload_float(path: Path, device: str):
    """Evaluate what is shipped: the bf16 weights, computed in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------- main


def evaluate(dirs: dict, sp, train_ids, val_ids, val_text: str, starts, args) -> dict:
    """Metrics of the shipped bf16 checkpoints, computed in plain float32 (no TF32) as the tests do."""
    torch.backends.cuda.matmul.allow_tf32 = False
    target, draft = reload_float(dirs["target"], args.device), reload_float(dirs["draft"], args.device)
    val_windows = eval_windows(val_ids, args.eval_window)
    nll = {"target": mean_nll(target, val_windows), "draft": mean_nll(draft, val_windows)}
    uni = unigram_nll(train_ids, val_ids, sp.get_piece_size())
    # A prefix of the validation split (whole lines, ~8k tokens) ships in metrics.json so the tests can
    # recompute its loss with transformers without the corpus.
    sample_text = val_text[: val_text.rindex("\n", 0, args.sample_chars) + 1]
    sample_ids = torch.tensor(sp.encode(sample_text), device=args.device)
    sample_windows_ = eval_windows(sample_ids, args.eval_window)
    sample_nll = {"target": mean_nll(target, sample_windows_), "draft": mean_nll(draft, sample_windows_)}
    prompt = torch.tensor([[BOS_ID] + sp.encode("ROMEO:")], device=args.device)
    greedy = generate(target, prompt, 64, 0.0, torch.Generator())[0, 1:].tolist()
    return {
        "corpus": args.corpus.name,
        "split": {"train_fraction": TRAIN_FRACTION, "train_tokens": len(train_ids),
                  "val_tokens": len(val_ids)},
        "tokenizer": {"type": "sentencepiece bpe, byte_fallback", "vocab_size": sp.get_piece_size()},
        "params": {"target": count_params(target), "draft": count_params(draft)},
        "eval_window": args.eval_window,
        "val_loss": nll,
        "val_ppl": {k: math.exp(v) for k, v in nll.items()},
        "unigram_val_loss": uni,
        "unigram_val_ppl": math.exp(uni),
        "greedy_agreement": greedy_agreement(target, draft, val_windows, args.device),
        "spec_decode_greedy": spec_acceptance(target, draft, train_ids, starts, args),
        "target_greedy_from_ROMEO": sp.decode(greedy),
        "eval_device": device_name(args.device),
        "validation_sample": {"tokens": len(sample_ids), "window": args.eval_window, "val_loss": sample_nll,
                              "text": sample_text},
    }  # fmt: skip


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def train_and_save(dirs: dict, sp, sp_path: Path, train_text: str, train_ids, val_ids, starts, args) -> dict:
    """Train target (best of the trials), then distill the draft; save both; return the training log."""
    start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = True
    vocab = sp.get_piece_size()
    val_windows = eval_windows(val_ids, args.eval_window)
    budget_end = time.time() + args.time_budget
    target_end = time.time() + 0.6 * args.time_budget
    target, target_runs = train_target_trials(sp, train_text, val_windows, vocab, args, target_end)
    torch.manual_seed(args.seed)
    draft = make_model(draft_shape(args), vocab).to(args.device)
    print(f"target {count_params(target):,} params, draft {count_params(draft):,} params", flush=True)
    draft_run = train_draft(draft, target, train_ids, starts, args, budget_end)
    for name, model in (("target", target), ("draft", draft)):
        save_hf_dir(model, sp_path, dirs[name])
    return {"target_trials": target_runs, "draft": draft_run, "seconds": round(time.time() - start, 1),
            "device": device_name(args.device), "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip


def draft_shape(args) -> dict:
    heads = args.draft_hidden // 64
    return dict(hidden_size=args.draft_hidden, intermediate_size=args.draft_intermediate,
                num_hidden_layers=args.draft_layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), head_dim=64)  # fmt: skip


def retrain_draft(dirs: dict, sp_path: Path, train_ids, starts, args, previous: dict | None) -> dict:
    """Distill a new draft from the shipped target (bf16 weights, trained in fp32 with bf16 autocast)."""
    from transformers import AutoModelForCausalLM

    start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = True
    target = AutoModelForCausalLM.from_pretrained(dirs["target"], dtype=torch.float32).to(args.device)
    torch.manual_seed(args.seed)
    draft = make_model(draft_shape(args), target.config.vocab_size).to(args.device)
    print(f"draft {count_params(draft):,} params, shape {draft_shape(args)}", flush=True)
    draft_run = train_draft(draft, target, train_ids, starts, args, time.time() + args.time_budget)
    work = Path(tempfile.mkdtemp())  # the tokenizer lives in the directory being replaced
    save_hf_dir(draft, shutil.copy(sp_path, work / "sp.model"), dirs["draft"])
    training = dict(previous or {})
    training["draft"] = {**draft_run, "shape": draft_shape(args), "device": device_name(args.device),
                         "args": {k: str(v) for k, v in vars(args).items()},
                         "seconds_total": round(time.time() - start, 1)}  # fmt: skip
    return training


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    text = args.corpus.read_text(encoding="utf-8")
    train_text, val_text = split_corpus(text)
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = {"target": args.out / "shakespeare-target", "draft": args.out / "shakespeare-draft"}
    if args.eval_only or args.draft_only:
        sp_path = dirs["target"] / "tokenizer.model"
    else:
        work = Path(tempfile.mkdtemp())  # a copy: --tokenizer may live in the directory being replaced
        sp_path = shutil.copy(args.tokenizer, work / "sp.model") if args.tokenizer else None
        sp_path = Path(sp_path or train_tokenizer(train_text, args.vocab_size, work / "sp"))
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    train_ids = torch.tensor(sp.encode(train_text), dtype=torch.long, device=args.device)
    val_ids = torch.tensor(sp.encode(val_text), dtype=torch.long, device=args.device)
    if args.max_eval_tokens:
        val_ids = val_ids[: args.max_eval_tokens]
    starts = line_starts(sp, train_ids)
    print(f"vocab {sp.get_piece_size()}, train {len(train_ids)} tokens, val {len(val_ids)} tokens, "
          f"{len(starts)} line starts, device {args.device}", flush=True)  # fmt: skip

    metrics_path = args.out / "metrics.json"
    previous = json.loads(metrics_path.read_text())["training"] if metrics_path.exists() else None
    if args.eval_only:  # keep the record of how the shipped models were trained
        training = previous
    elif args.draft_only:
        training = retrain_draft(dirs, sp_path, train_ids, starts, args, previous)
    else:
        training = train_and_save(dirs, sp, sp_path, train_text, train_ids, val_ids, starts, args)
    for path in dirs.values():
        check_tokenizer_matches(path, sp, [val_text[:2000], "ROMEO:\nBut soft!", " héllo  wörld\t🙂\n"])
    metrics = evaluate(dirs, sp, train_ids, val_ids, val_text, starts, args)
    metrics["training"] = training
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    show = {k: v for k, v in metrics.items() if k not in ("validation_sample", "training")}
    print(json.dumps(show, indent=2), flush=True)
    print(f"wrote {dirs['target']} {dirs['draft']} {metrics_path} in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
