"""The duplex mode's SFT examples: every chunk of every dialogue as one decision (`ChunkDataset`), the
chunks where the decision changes listed more often, and recovery examples (the assistant's own
mistake in the prompt; `recovery_examples`). DuplexTask.history_and_target builds each one's prompt
and target (rlhf/modes/duplex.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from speechrl.rlhf.modes.duplex_data import ACT, LISTEN, PAUSE, SPEAK, Dialogue, is_event, window

# variants of a chunk's example: the reference chunks so far (""), or after a wrong decision of the
# assistant's own (recovery_examples)
FALSE_START, LATE_START = "false_start", "late_start"


@dataclass(frozen=True)
class ChunkExample:
    """One decision of a dialogue, as SFT trains it."""

    id: str  # "<dialogue id>/c<chunk>", then "/<variant>" for a recovery example
    dialogue: Dialogue
    chunk: int
    variant: str = ""  # "", FALSE_START or LATE_START (recovery_examples)


def recovery_examples(d: Dialogue) -> list[tuple[int, str]]:
    """The chunks of `d` where SFT also trains what to do after a wrong decision of the assistant's own,
    as (chunk, variant). On the clock the policy reads its own chunks, while SFT's prompts hold only
    the reference's, so a policy that never saw its mistakes in a prompt may carry them on (a chunk
    started too early going on as a barge-in, a silent chunk where the answer was due followed by
    more silence; docs/duplex.md). The two mistakes, where they happen:

      FALSE_START  the chunk before spoke, though the user had the floor (the last chunk of their
                   speech, or any chunk of a pause): be silent now
      LATE_START   the chunks since an answer was due were silent (one or two of them): start now,
                   from the answer's first chunk"""
    out = []
    for c in range(1, d.num_chunks):
        label, before = d.labels[c], d.labels[c - 1]
        if label == PAUSE or label == LISTEN and before == LISTEN and c + 1 < d.num_chunks and d.labels[c + 1] != LISTEN:
            out.append((c, FALSE_START))  # a pause, or the chunk the user's speech ends in
        if label == SPEAK and c in d.reply and d.reply[c][1] in (1, 2):
            onset = c - d.reply[c][1]
            if d.labels[onset] == SPEAK and onset in d.reply and d.reply[onset][1] == 0:
                out.append((c, LATE_START))  # one or two chunks into an answer that was due
    return out


class ChunkDataset:
    """Every chunk of every dialogue, as SFT's loop indexes them: (ChunkExample, what the encoder hears).

    With `event_repeats` > 1 the chunks where a decision changes (`is_event`) are listed that many
    times: a dialogue has one chunk where the answer starts against a dozen where the user talks,
    and after 600 SFT steps without repeats the policy kept listening where it should have started
    (P(speak) 0.16 at the onsets of held-out answers, 0.93 once speaking; docs/duplex.md). The chunks
    where a tool call is due are listed `call_repeats` times (None: `event_repeats`). With
    `recovery_repeats` > 0 the `recovery_examples` are listed that many times each."""

    def __init__(self, dialogues: list[Dialogue], chunk_samples: int, window_samples: int, event_repeats: int = 1,
                 recovery_repeats: int = 0, call_repeats: Optional[int] = None):
        self.dialogues, self.chunk_samples, self.window_samples = dialogues, chunk_samples, window_samples
        calls = event_repeats if call_repeats is None else call_repeats

        def repeats(d: Dialogue, c: int) -> int:
            return (calls if d.labels[c] == ACT else event_repeats) if is_event(d, c) else 1

        self.index = [(d, c, "") for d in dialogues for c in range(d.num_chunks) for _ in range(repeats(d, c))]
        self.index += [(d, c, variant) for d in dialogues for c, variant in recovery_examples(d)
                       for _ in range(recovery_repeats)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[ChunkExample, np.ndarray]:
        d, c, variant = self.index[i]
        return (ChunkExample(f"{d.id}/c{c}" + (f"/{variant}" if variant else ""), d, c, variant),
                window(d, c, self.chunk_samples, self.window_samples))

    def spread(self, n: int) -> "ChunkDataset":
        """At most n examples evenly spread over the dialogues (a held-out loss sees every kind)."""
        picks = np.linspace(0, len(self.index) - 1, num=min(n, len(self.index))).round().astype(int)
        out = ChunkDataset([], self.chunk_samples, self.window_samples)
        out.index = [self.index[int(i)] for i in dict.fromkeys(picks.tolist())]
        return out

    def summary(self) -> dict:
        return {"examples": len(self), "kept": len(self), "bad": 0, "reasons": []}
