"""Chat turns: render a conversation with the tokenizer's chat template and score only the
assistant turns, each given everything before it.

A conversation is a list of ``{"role", "content"}`` messages. The whole conversation is
rendered once and tokenized once, with offsets; assistant turn i spans, in characters,
from the end of the rendered prompt ``messages[:i]`` (with the generation prompt; for a
conversation that opens with an assistant turn, the template's preamble and the turn's own
header, see `preamble`) to the end of its content, and its END-OF-TURN token is the first token after the content (e.g.
'<|im_end|>', '<|eot_id|>'). The rendered prompt must be a prefix of the rendered
conversation, and the content must follow it: templates that render history differently
from a live prompt (dropping reasoning, say) are refused by name rather than mis-scored.
Each turn is reported with and without its end-of-turn token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core.continuation import range_windows
from ..errors import DataError, ModelError
from ..model.loading import LoadedModel
from ..model.scorer import ScoreOptions, check_vocabulary, resolve_window, score_windows
from .score import as_loaded_model, check_batch_tokens
from .tables import char_spans, token_strings, tokens_frame
from .text import ROLES_SCORED, Document, TokenizedDocument, check_messages, require_whole, tokenize_documents


@dataclass(frozen=True)
class Turn:
    """One assistant turn in the rendered conversation, in characters."""

    prompt_end: int  # where the turn starts (end of the rendered prompt before it)
    content_start: int
    content_end: int
    turn_end: int  # end of the rendered conversation up to and including this turn


def render(messages: list[dict], tokenizer, where: str) -> tuple[str, list[Turn]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{where}: the tokenizer has no chat template, so a conversation cannot be rendered. "
            "Use a chat model's tokenizer, or set `tokenizer.chat_template` (a Jinja string)."
        )

    def text(part, generation_prompt=False):
        try:
            return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises its own errors (e.g. a template's raise_exception)
            raise DataError(
                f"{where}: the chat template cannot render these messages ({type(exc).__name__}: {exc})."
            ) from exc

    full = text(messages)
    turns = []
    for i, m in enumerate(messages):
        if m["role"] != ROLES_SCORED:
            continue
        prompt = text(messages[:i], generation_prompt=True) if i else preamble(m["role"], text, where)
        through = text(messages[: i + 1])
        if not full.startswith(prompt) or not full.startswith(through):
            raise DataError(
                f"{where}[{i}]: the rendered prompt before this assistant turn must be a prefix of the rendered "
                "conversation (it is not: the template renders history differently from a live prompt). "
                "Score this conversation with a template that renders turns incrementally."
            )
        start = full.find(m["content"], len(prompt), len(through))
        if start < 0 or full[len(prompt) : start].strip():
            raise DataError(
                f"{where}[{i}]: the assistant content must follow the rendered prompt in the conversation "
                "(the template changed or moved it). Check the template's handling of assistant messages."
            )
        turns.append(Turn(len(prompt), start, start + len(m["content"]), len(through)))
    return full, turns


# Stands for the content of a conversation's first message when its preamble is rendered:
# plain letters, which no template escapes, trims or splits.
_SENTINEL = "LmevalFirstTurnContentSentinel"


def preamble(role: str, text, where: str) -> str:
    """What the template writes before the content of a conversation's FIRST message: its
    preamble (a BOS, a default system prompt) and the message's own header. A conversation
    that opens with an assistant turn (a greeting bot, a transcript) has no history to
    render as a prompt, and transformers refuses an empty conversation; so the first message
    is rendered with a stand-in content, and everything before the stand-in conditions the
    turn, exactly as it does in the rendered conversation."""
    rendered = text([{"role": role, "content": _SENTINEL}])
    at = rendered.find(_SENTINEL)
    if at < 0:
        raise DataError(
            f"{where}[0]: the chat template must write a message's content verbatim (it dropped or rewrote "
            f"the content of a first {role} message), so the turn cannot be found. Check the template's "
            "handling of the first message."
        )
    return rendered[:at]


def turn_tokens(offsets: np.ndarray, turn: Turn) -> tuple[int, int, int | None]:
    """``(first, end, eot)``: content tokens ``[first, end)`` (a token whose span ends
    past the prompt starts it) and the end-of-turn token's index (None if the turn ends
    with its content)."""
    ends, starts = offsets[:, 1], offsets[:, 0]
    first = int(np.searchsorted(np.maximum.accumulate(ends), turn.prompt_end, side="right"))
    end = max(first, int(np.searchsorted(starts, turn.content_end, side="left")))
    eot = end if end < len(offsets) and starts[end] < turn.turn_end else None
    return first, end, eot


def score_chats(
    conversations,
    model,
    *,
    bos="auto",
    max_length: int | None = None,
    stride: int | None = None,
    batch_tokens: int = 16384,
    name: str | None = None,
    options: ScoreOptions | None = None,
) -> pd.DataFrame:
    """Score the assistant turns of each conversation; one row per scored token.

    Columns of `score_texts` (doc_id = the conversation's index; char spans into the
    rendered conversation, ``attrs["rendered"]``), plus turn (the message index of the
    assistant turn) and end_of_turn (the turn's end-of-turn token). `turn_table` of the
    result totals each turn with and without its end-of-turn token.
    """
    if isinstance(conversations, (str, dict)) or not list(conversations):
        raise DataError("conversations: must be a non-empty list of conversations (each a list of messages).")
    lm = as_loaded_model(model, name)
    options = options or ScoreOptions(batch_tokens=check_batch_tokens(batch_tokens))
    chats = [check_messages(c, f"conversations[{i}]") for i, c in enumerate(conversations)]
    columns, docs = score_chat_documents(lm, list(enumerate(chats)), bos, max_length, stride, options)
    columns["char_start"], columns["char_end"] = char_spans(docs, columns["doc_index"], columns["position"]).T
    columns["token"] = token_strings(lm.tokenizer, columns["token_id"])
    frame = tokens_frame(lm.name, list(range(len(chats))), columns)
    order = np.lexsort((columns["position"], columns["doc_index"]))
    frame["turn"], frame["end_of_turn"] = columns["turn"][order], columns["end_of_turn"][order]
    frame.attrs["rendered"] = [d.text for d in docs]
    return frame


def score_chat_documents(lm: LoadedModel, chats, bos, max_length, stride, options, progress=None, baseline=None):
    """``chats`` is ``[(doc_id, messages)]``. Returns the scorer's columns (plus ``turn`` and
    ``end_of_turn``) and the rendered, tokenized conversations."""
    rendered = [(doc_id, *render(messages, lm.tokenizer, f"messages of {doc_id!r}")) for doc_id, messages in chats]
    docs = tokenize_documents([Document(d, text) for d, text, _ in rendered], lm.tokenizer, bos)
    # A template that writes the BOS itself already conditions on it: never add a second one.
    docs = [
        TokenizedDocument(d.doc_id, d.text, d.token_ids, d.offsets, ())
        if d.prefix and len(d.token_ids) and d.token_ids[0] == d.prefix[0]
        else d
        for d in docs
    ]
    length, step = resolve_window(lm, max_length, stride)
    check_vocabulary(lm, max((int(d.token_ids.max()) for d in docs if len(d.token_ids)), default=0))
    windows, labels = [], []
    for i, ((_, _, turns), d) in enumerate(zip(rendered, docs)):
        ranges, turn_of, eot_at = [], {}, set()
        message_index = [j for j, m in enumerate(chats[i][1]) if m["role"] == ROLES_SCORED]
        for turn, j in zip(turns, message_index):
            first, end, eot = turn_tokens(d.offsets, turn)
            stop = end + (eot is not None)
            if stop > first:
                ranges.append((first, stop))
                turn_of.update(dict.fromkeys(range(first, stop), j))
                if eot is not None:
                    eot_at.add(eot)
        windows += range_windows(i, d.token_ids.tolist(), d.prefix, length, step, ranges)
        labels.append((turn_of, eot_at))
    columns = score_windows(
        lm, windows, options, progress=progress, doc_names=[d.doc_id for d in docs], baseline=baseline
    )
    pairs = list(zip(columns["doc_index"].tolist(), columns["position"].tolist()))
    columns["turn"] = np.array([labels[i][0][p] for i, p in pairs], dtype=np.int64)
    columns["end_of_turn"] = np.array([p in labels[i][1] for i, p in pairs], dtype=bool)
    return columns, docs


def turn_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per assistant turn of a `score_chats` frame: doc_id, turn, n_tokens and
    nll_sum WITH the end-of-turn token, n_tokens_content and nll_sum_content WITHOUT it
    (nats)."""
    nll = frame["nll"].astype(np.float64)
    content = frame.assign(nll=nll.where(~frame["end_of_turn"], 0.0), n=(~frame["end_of_turn"]).astype(np.int64))
    grouped = content.assign(nll_all=nll).groupby(["doc_id", "turn"], sort=True)
    return grouped.agg(
        n_tokens=("nll_all", "size"),
        nll_sum=("nll_all", "sum"),
        n_tokens_content=("n", "sum"),
        nll_sum_content=("nll", "sum"),
    ).reset_index()


def score_chat_group(lm, documents, config, options, progress, piece=None, cache=None, baseline=None):
    """`lmeval run` with ``data.messages_field``: the assistant turns of each conversation
    (a document's text is its messages as JSON). Returns the part's columns and the scored
    text of each conversation: its assistant contents joined by newlines (for bytes and words)."""
    require_whole(piece, documents)
    s = config.scoring
    chats = [(d.doc_id, json.loads(d.text)) for d in documents]
    columns, docs = score_chat_documents(lm, chats, s.bos, s.max_length, s.stride, options, progress, baseline)
    columns["char_start"], columns["char_end"] = char_spans(docs, columns["doc_index"], columns["position"]).T
    columns["token"] = token_strings(lm.tokenizer, columns["token_id"])
    del columns["topk_ids"], columns["topk_probs"]
    texts = ["\n".join(m["content"] for m in messages if m["role"] == ROLES_SCORED) for _, messages in chats]
    return columns, texts
