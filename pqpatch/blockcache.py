"""GPU block cache bookkeeping for the offloaded KV store (policy only: no tensors of keys or values here).

The offloaded middle of a layer is cut into blocks of `block` consecutive positions. Each row (one sequence x
KV head) owns `capacity` GPU slots, each holding one block. After every decode step the blocks that the
selection touched are counted, and missed blocks may be admitted, evicting a resident one:
- "lfu": a block's count of the steps that selected it; a missed block enters when a slot is free or its count
  beats the least-frequently-used resident block (ties go to the resident one, so the cache does not thrash).
- "lru": a missed block enters when a slot is free or some resident block was not used in this step; the least
  recently used one leaves.
At most `max_admit` blocks enter per row and step, which bounds the copy traffic of one step.
All state lives on the CPU: selection indices come to the CPU anyway for the gather from the host store.
"""

from __future__ import annotations

import torch

__all__ = ["BlockCache"]


class BlockCache:
    """Residency of blocks in GPU slots for `rows` independent rows.

    slot_of: [rows, num_blocks] int64, the slot holding a block or -1; block_in: [rows, capacity] the block in a
    slot or -1; freq / last_use: [rows, num_blocks] int64 selection counts and the last step that selected it.
    """

    def __init__(self, rows: int, num_blocks: int, capacity: int, policy: str = "lfu", max_admit: int | None = None):
        if policy not in ("lfu", "lru"):
            raise ValueError(f"cache policy must be 'lfu' or 'lru', got {policy!r}")
        self.policy = policy
        self.capacity = capacity
        self.max_admit = max(1, capacity // 8) if max_admit is None else max_admit
        self.slot_of = torch.full((rows, num_blocks), -1, dtype=torch.long)
        self.block_in = torch.full((rows, capacity), -1, dtype=torch.long)
        self.freq = torch.zeros(rows, num_blocks, dtype=torch.long)
        self.last_use = torch.full((rows, num_blocks), -1, dtype=torch.long)
        self.step = 0

    def lookup(self, blocks: torch.Tensor) -> torch.Tensor:
        """Slots of `blocks` [rows, n] (-1 entries allowed); returns [rows, n] slot or -1 (miss / no block)."""
        safe = blocks.clamp_min(0)
        slots = torch.gather(self.slot_of, 1, safe)
        return torch.where(blocks >= 0, slots, torch.full_like(slots, -1))

    def _victim(self, row: int, used_now: torch.Tensor) -> int:
        """The slot to free in `row`, or -1 if every resident block was used in this step (LRU) ."""
        resident = self.block_in[row]
        if (resident < 0).any():
            return int((resident < 0).nonzero()[0])
        if self.policy == "lru":
            age = self.last_use[row, resident]
            age = torch.where(used_now[resident], torch.full_like(age, self.step + 1), age)
            slot = int(age.argmin())
            return slot if int(age[slot]) < self.step else -1
        key = self.freq[row, resident] * (self.step + 2) + self.last_use[row, resident]  # freq, then recency
        return int(key.argmin())

    def admit(self, blocks: torch.Tensor) -> list[tuple[int, int, int]]:
        """Record one step's selection and admit missed blocks.

        blocks: [rows, n] block ids touched in this step (-1 = none; repeats allowed).
        Returns the (row, block, slot) copies the caller must make, host store -> GPU slot.
        """
        copies: list[tuple[int, int, int]] = []
        nb = self.slot_of.shape[1]
        for row in range(blocks.shape[0]):
            b = blocks[row]
            used = torch.unique(b[b >= 0])
            if used.numel() == 0:
                continue
            self.freq[row, used] += 1
            self.last_use[row, used] = self.step
            if self.capacity == 0:
                continue
            used_now = torch.zeros(nb, dtype=torch.bool)
            used_now[used] = True
            missed = used[self.slot_of[row, used] < 0]
            if self.policy == "lfu":  # most frequent first
                missed = missed[torch.argsort(self.freq[row, missed], descending=True, stable=True)]
            for blk in missed[: self.max_admit].tolist():
                slot = self._victim(row, used_now)
                if slot < 0:
                    break
                old = int(self.block_in[row, slot])
                if old >= 0:
                    if self.policy == "lfu" and self.freq[row, blk] <= self.freq[row, old]:
                        break  # the rest are no more frequent than this one
                    self.slot_of[row, old] = -1
                self.block_in[row, slot] = blk
                self.slot_of[row, blk] = slot
                copies.append((row, blk, slot))
        self.step += 1
        return copies
