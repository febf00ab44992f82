"""Validation's tokenizing pass, one row at a time: the over-length policy, the trained tokens, whether the stop token
is trained at the end of every assistant turn, the round-trip of the rendered text, and the token lengths the
statistics and the padding waste come from. A classifier's rows are counted as the tokenizer encodes text and pair."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Optional, Sequence

from lorapipe.data.records import Problem, Record
from lorapipe.data.report import AuditReport, PaddingWaste, TokenStats


def _percentile(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return 0.0
    k = (len(sorted_vals) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return float(sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo))


def padding_waste(lengths: list[int], micro_batch_size: int) -> float:
    """Fraction of a padded batch's slots that are padding, batching `lengths` in the given order."""
    slots = real = 0
    for i in range(0, len(lengths), micro_batch_size):
        batch = lengths[i:i + micro_batch_size]
        slots += max(batch) * len(batch)
        real += sum(batch)
    return 0.0 if slots == 0 else 1 - real / slots


def row_facts(rec: Record) -> dict:
    """The facts of a row the expectation suite checks (messages, prompt and response characters)."""
    if rec.chosen is not None:  # task: preference: the shorter answer of the two
        prompt = sum(len(m.get("content") or "") for m in rec.messages if m["role"] != "assistant")
        resp = min(len("".join(m.get("content") or "" for m in side).strip())
                   for side in (rec.chosen, rec.rejected) if side is not None)
        return {"n_messages": len(rec.messages) + 1, "prompt_chars": prompt, "response_chars": resp}
    if rec.text is not None:
        return {"n_messages": 1, "prompt_chars": 0, "response_chars": len(rec.text.strip())}
    prompt = sum(len(m.get("content") or "") for m in rec.messages if m["role"] != "assistant")
    resp = min((len((m.get("content") or "").strip()) for m in rec.messages if m["role"] == "assistant"), default=0)
    return {"n_messages": len(rec.messages), "prompt_chars": prompt, "response_chars": resp}


HISTOGRAM_BINS = 20


class TokenAudit:
    """Per-row tokenizing pass: over-length policy, trainable tokens, the stop token, round-trip, lengths."""

    def __init__(self, tokenizer: Any, max_len: Optional[int], overlength: str):
        self.tok, self.max_len, self.overlength = tokenizer, max_len, overlength
        self.eos_id = tokenizer.eos_token_id
        # what ends a turn: EOS or the template's own turn end (<|eot_id|>, <|im_end|>): generation stops on either
        from lorapipe.data.end_tokens import end_token_ids

        self.end_ids = set(end_token_ids(tokenizer)) if tokenizer is not None else set()
        self.lengths: list[int] = []
        self.rows = self.stop_rows = self.roundtrip = self.roundtrip_checked = self.truncated = self.trained = 0

    def add(self, rec: Record, problems: list[Problem]) -> tuple[list[str], dict]:
        """Audit one record: the error codes that reject it (empty when accepted) and its facts (empty when
        rejected)."""
        return self.add_batch([rec], [problems])[0]

    def add_batch(self, recs: list[Record], problems: list[list[Problem]]) -> list[tuple[list[str], dict]]:
        """Audit records at once (the tokenizer encodes and decodes the batch in its own threads), each exactly as
        one by one: per record, `add`'s result, its problems appended to its own list."""
        from lorapipe.data.render import RenderError, decode_batch, encode_batch

        out: list[tuple[list[str], dict]] = []
        roundtrips: list[tuple[list[int], str]] = []
        for rec, found, enc in zip(recs, problems, encode_batch(self.tok, recs, self.max_len
                                                                  if self.overlength == "truncate" else None)):
            self.rows += 1
            if isinstance(enc, RenderError):
                found.append(Problem(rec.source, rec.line, "(template)", str(enc), "set model.chat_template",
                                     "template_error"))
                out.append((["template_error"], {}))
                continue
            rejected = self.length_policy(rec, enc.full_length, found, "tokens after the chat template,",
                                          "raise train.max_seq_length, shorten the row, or set validation.overlength "
                                          "to 'truncate' or 'drop'")
            if rejected:
                out.append(([rejected], {}))
                continue
            n_trained = sum(enc.assistant_mask)
            if n_trained == 0:
                found.append(Problem(rec.source, rec.line, "(row)", "no trainable token after masking (and "
                                     "truncation)", "shorten the prompt or raise train.max_seq_length",
                                     "no_trainable_tokens"))
                out.append((["no_trainable_tokens"], {}))
                continue
            if _turns_end_with(enc.input_ids, enc.assistant_mask, self.end_ids):
                self.stop_rows += 1
            if not enc.truncated:  # a truncated row cannot round-trip by construction: not counted either way
                roundtrips.append((enc.input_ids, enc.rendered))
            n = len(enc.input_ids)
            self.lengths.append(n)
            self.trained += n_trained
            out.append(([], {**row_facts(rec), "n_tokens": n, "n_trainable_tokens": n_trained}))
        if roundtrips:
            decoded = decode_batch(self.tok, [ids for ids, _ in roundtrips])
            self.roundtrip_checked += len(roundtrips)
            self.roundtrip += sum(d == text for d, (_, text) in zip(decoded, roundtrips))
        return out

    def length_policy(self, rec: Record, length: int, problems: list[Problem], counted: str, fix: str) -> Optional[str]:
        """validation.overlength for a row of `length` tokens over the limit: the code that rejects it (fail, drop),
        or None (within the limit, or truncated: said as a warning and counted)."""
        if self.max_len is None or length <= self.max_len:
            return None
        if self.overlength in ("fail", "drop"):
            code = "overlength" if self.overlength == "fail" else "overlength_dropped"
            problems.append(Problem(rec.source, rec.line, "(row)",
                                    f"{length} {counted} above train.max_seq_length={self.max_len}", fix, code,
                                    severity="error" if self.overlength == "fail" else "dropped"))
            return code
        self.truncated += 1
        problems.append(Problem(rec.source, rec.line, "(row)", f"{length} tokens truncated to {self.max_len}",
                                "none needed, or raise train.max_seq_length", "overlength_truncated",
                                severity="warning"))
        return None

    def finish(self, micro_batch_sizes: Sequence[int], template_source: str) -> tuple[TokenStats, AuditReport]:
        n = len(self.lengths)
        s = sorted(self.lengths)
        hist: list[list[float]] = []
        if s:
            lo, hi = s[0], s[-1]
            width = max(1, math.ceil((hi - lo + 1) / HISTOGRAM_BINS))
            counts = Counter((x - lo) // width for x in s)
            hist = [[lo + b * width, counts.get(b, 0)] for b in range(HISTOGRAM_BINS) if lo + b * width <= hi]
        waste = [PaddingWaste(micro_batch_size=mb, in_order=padding_waste(self.lengths, mb),
                              length_grouped=padding_waste(s, mb)) for mb in sorted(set(micro_batch_sizes))]
        stats = TokenStats(rows=n, p50=_percentile(s, 0.5), p95=_percentile(s, 0.95), max=s[-1] if s else 0,
                           total_tokens=sum(self.lengths), trainable_tokens=self.trained, truncated_rows=self.truncated,
                           padding_waste=waste, histogram=hist)
        stop_frac = self.stop_rows / n if n else 0.0
        pad_is_eos = self.tok.pad_token_id is not None and self.tok.pad_token_id == self.eos_id
        if n == 0:
            ok, why = False, "no row has a trained token: every label is masked, nothing would be learned"
        elif self.stop_rows == 0:
            ok, why = False, (f"no row trains the stop token {self.tok.eos_token!r} at the end of an assistant turn: "
                              "the model would never learn to stop; use a chat template that closes assistant turns "
                              "with the EOS/turn-end token (model.chat_template)")
        elif stop_frac < 1.0:
            ok, why = True, f"{n - self.stop_rows} row(s) do not train the stop token (truncated rows lose it)"
        else:
            ok, why = True, "every row trains the stop token"
        if pad_is_eos:
            why += "; PAD is EOS, but padding is masked by position, so EOS stays trained"
        roundtrip = self.roundtrip / self.roundtrip_checked if self.roundtrip_checked else 1.0
        audit = AuditReport(rows=n, trainable_rows_fraction=n / self.rows if self.rows else 0.0,
                            stop_token_trained_fraction=stop_frac, roundtrip_fraction=roundtrip,
                            eos_token=self.tok.eos_token, pad_token=self.tok.pad_token, pad_is_eos=pad_is_eos,
                            chat_template_source=template_source, passed=ok, explanation=why)
        return stats, audit


def _turns_end_with(ids: list[int], mask: list[int], end_ids: set[int], window: int = 3) -> bool:
    """True when every contiguous trained run has an end id (EOS or the template's turn end) among its last `window`
    tokens."""
    if not end_ids:
        return False
    runs = [m.span() for m in _TRAINED_RUN.finditer(bytes(mask))]  # the runs of 1s, found in C
    return bool(runs) and all(not end_ids.isdisjoint(ids[max(s, e - window):e]) for s, e in runs)


_TRAINED_RUN = re.compile(b"\x01+")


class ClassificationTokenAudit(TokenAudit):
    """A classifier reads the text (and pair) the tokenizer encodes with its special tokens, and every token feeds the
    label: token counts and the over-length policy, no stop-token audit (nothing is generated)."""

    def add_batch(self, recs: list[Record], problems: list[list[Problem]]) -> list[tuple[list[str], dict]]:
        return [self.add(rec, found) for rec, found in zip(recs, problems)]

    def add(self, rec: Record, problems: list[Problem]) -> tuple[list[str], dict]:
        self.rows += 1
        enc = self.tok(rec.text, rec.text_pair, truncation=False)
        n = len(enc["input_ids"])
        rejected = self.length_policy(rec, n, problems, "tokens,",
                                      "raise train.max_seq_length, shorten the text, or set validation.overlength: "
                                      "truncate (the usual choice for classification) or drop")
        if rejected:
            return [rejected], {}
        n = min(n, self.max_len) if self.max_len is not None else n
        self.lengths.append(n)
        self.trained += n
        return [], {**row_facts(rec), "n_tokens": n, "n_trainable_tokens": n}

    def finish(self, micro_batch_sizes: Sequence[int], template_source: str  # type: ignore[override]
               ) -> tuple[TokenStats, None]:
        stats, _ = super().finish(micro_batch_sizes, template_source)
        return stats, None


class PreferenceTokenAudit(TokenAudit):
    """task: preference: both sides of a pair (or the one answer of unpaired feedback) rendered with the prompt as
    SFT renders a row; the over-length policy on the longer side; a pair whose two sides are the same tokens once
    cut to the limit is rejected (the difference lies past the cut: it teaches nothing), with the length that would
    keep it; the learns-to-stop audit counts a row when every side it trains ends on the stop token."""

    def __init__(self, tokenizer: Any, max_len: Optional[int], overlength: str):
        super().__init__(tokenizer, max_len, overlength)
        self.identical_after_cut = 0
        self.length_keeping_them: Optional[int] = None

    def add(self, rec: Record, problems: list[Problem]) -> tuple[list[str], dict]:
        return self.add_batch([rec], [problems])[0]

    def add_batch(self, recs: list[Record], problems: list[list[Problem]]) -> list[tuple[list[str], dict]]:
        from lorapipe.data.render import RenderError, decode_batch, encode_batch

        sides = [[rec.side("chosen")] + ([rec.side("rejected")] if rec.rejected is not None else []) for rec in recs]
        encoded = iter(encode_batch(self.tok, [s for row in sides for s in row], None))  # full length: cut below
        out: list[tuple[list[str], dict]] = []
        roundtrips: list[tuple[list[int], str]] = []
        for rec, found, row_sides in zip(recs, problems, sides):
            self.rows += 1
            encs = [next(encoded) for _ in row_sides]
            failed = next((e for e in encs if isinstance(e, RenderError)), None)
            if failed is not None:
                found.append(Problem(rec.source, rec.line, "(template)", str(failed), "set model.chat_template",
                                     "template_error"))
                out.append((["template_error"], {}))
                continue
            longest = max(e.full_length for e in encs)
            rejected = self.length_policy(rec, longest, found, "tokens after the chat template (the longer side),",
                                          "raise train.max_seq_length, shorten the row, or set validation.overlength "
                                          "to 'truncate' or 'drop'")
            if rejected:
                out.append(([rejected], {}))
                continue
            cut = self.max_len if self.max_len is not None else longest
            ids = [e.input_ids[:cut] for e in encs]
            masks = [e.assistant_mask[:cut] for e in encs]
            if len(encs) == 2 and ids[0] == ids[1]:
                differ = next((i for i, (a, b) in enumerate(zip(encs[0].input_ids, encs[1].input_ids)) if a != b),
                              min(len(encs[0].input_ids), len(encs[1].input_ids)))
                self.identical_after_cut += 1
                self.length_keeping_them = max(self.length_keeping_them or 0, differ + 1)
                found.append(Problem(rec.source, rec.line, "chosen/rejected", f"chosen and rejected are the same "
                                     f"{cut} tokens once cut to train.max_seq_length={cut}: they differ from token "
                                     f"{differ + 1} on, so the pair teaches nothing",
                                     f"raise train.max_seq_length to at least {differ + 1}, or shorten the prompt",
                                     "pair_identical_after_truncation"))
                out.append((["pair_identical_after_truncation"], {}))
                continue
            trained = [sum(m) for m in masks]
            if min(trained) == 0:
                found.append(Problem(rec.source, rec.line, "(row)", "no trainable token on a side after masking (and "
                                     "truncation)", "shorten the prompt or raise train.max_seq_length",
                                     "no_trainable_tokens"))
                out.append((["no_trainable_tokens"], {}))
                continue
            if all(_turns_end_with(i, m, self.end_ids) for i, m in zip(ids, masks)):
                self.stop_rows += 1
            # each side not cut by the limit must decode back to what was rendered (as for SFT rows)
            roundtrips += [(e.input_ids, e.rendered) for e in encs if cut >= e.full_length]
            n = max(len(i) for i in ids)
            self.lengths.append(n)
            self.trained += sum(trained)
            out.append(([], {**row_facts(rec), "n_tokens": n, "n_trainable_tokens": sum(trained)}))
        if roundtrips:
            decoded = decode_batch(self.tok, [ids for ids, _ in roundtrips])
            self.roundtrip_checked += len(roundtrips)
            self.roundtrip += sum(d == text for d, (_, text) in zip(decoded, roundtrips))
        return out
