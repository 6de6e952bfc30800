"""Greedy generation and log-likelihoods on one rank, for the accuracy runs.

Prompts are processed in batches: one packed prefill writes the KV cache, then one decode step per
new token for every sequence still running. A sequence stops at `max_new` tokens or when its text
contains a stop string (the text is cut there, as lm-eval expects of a model).

`lockstep`: every rank takes the same number of forward passes (EP needs all ranks in every
collective): the number of batches and, per batch, of decode steps are agreed over the host group,
and a rank with nothing left runs empty passes. Decode under DWDP prefetches every routed expert at
every step: correct, and as slow as that sounds; DWDP is a prefill technique.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import RankContext
from .model import KVCache, Model, run_steps


@dataclass
class Generation:
    tokens: list[int]  # generated token ids, up to and including the stop point
    text: str  # decoded text, cut before the first stop string
    prefill_logits: torch.Tensor  # last-prompt-token logits of the prefill, float32 on the host


class TextEngine:
    def __init__(self, ctx: RankContext, model: Model, decode_tokens, lockstep: bool, batch_size: int = 16):
        self.ctx = ctx
        self.model = model
        self.decode_tokens = decode_tokens  # list[int] -> str
        self.lockstep = lockstep and ctx.world_size > 1
        self.batch_size = batch_size
        self.device = model.device

    def _agree_max(self, value: int) -> int:
        return max(self.ctx.all_gather_object(value)) if self.lockstep else value

    def _forward(self, tokens: torch.Tensor, seq_lens, **kw) -> torch.Tensor:
        self.model.experts.begin_forward()
        return run_steps(self.model.forward_steps(tokens.to(self.device), seq_lens, **kw))

    def generate(self, prompts: list[list[int]], max_new: int, stops: list[str]) -> list[Generation]:
        out: list[Generation] = []
        batches = [prompts[i : i + self.batch_size] for i in range(0, len(prompts), self.batch_size)]
        total = self._agree_max(len(batches))
        for b in range(total):
            out.extend(self._generate_batch(batches[b] if b < len(batches) else [], max_new, stops))
            self.ctx.progress(f"generate: batch {b + 1}/{total}")
        return out

    def _generate_batch(self, prompts: list[list[int]], max_new: int, stops: list[str]) -> list[Generation]:
        cfg = self.model.cfg
        longest = self._agree_max(max((len(p) for p in prompts), default=1))
        cache = KVCache.allocate(cfg, max(len(prompts), 1), longest + max_new, self.device, self.model.dtype)
        slots = torch.arange(len(prompts))
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
        logits = self._forward(tokens, [len(p) for p in prompts], cache=cache, slots=slots)
        prefill_logits = logits.cpu()
        generated: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        running = list(range(len(prompts)))
        for step in range(max_new):
            if running:
                next_tokens = logits.argmax(-1).cpu()
                still = []
                for row, i in enumerate(running):
                    generated[i].append(int(next_tokens[row]))
                    texts[i] = self.decode_tokens(generated[i])
                    if not any(s in texts[i] for s in stops):
                        still.append(i)
                running = still
            if step == max_new - 1 or self._agree_max(len(running)) == 0:
                break
            active = torch.tensor(running, dtype=torch.long)
            feed = torch.tensor([generated[i][-1] for i in running], dtype=torch.long)
            logits = self._forward(feed, None, cache=cache, slots=active)
        results = []
        for i in range(len(prompts)):
            text = texts[i]
            cut = min((text.index(s) for s in stops if s in text), default=len(text))
            results.append(Generation(generated[i], text[:cut], prefill_logits[i]))
        return results

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it."""
        out: list[tuple[float, bool]] = []
        batches = [pairs[i : i + self.batch_size] for i in range(0, len(pairs), self.batch_size)]
        total = self._agree_max(len(batches))
        for b in range(total):
            self.ctx.progress(f"loglikelihood: batch {b + 1}/{total}")
            batch = batches[b] if b < len(batches) else []
            seqs = [ctx + cont for ctx, cont in batch]
            tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
            logp = torch.log_softmax(self._forward(tokens, [len(s) for s in seqs], logits="all"), dim=-1).cpu()
            start = 0
            for (ctx_ids, cont), s in zip(batch, seqs):
                # logits at position p predict token p + 1
                rows = logp[start + len(ctx_ids) - 1 : start + len(s) - 1]
                target = torch.tensor(cont)
                out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
                start += len(s)
        return out
