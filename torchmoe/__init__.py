"""torchmoe: native-PyTorch training recipes for Mixture-of-Experts language models.

The layering of the subpackages is in docs/ARCHITECTURE.md. Tensor names carry their shape as a
suffix of dimension letters (``x_BSD``, ``topk_idx_TK``, ``counts_E``); each file's legend
names the letters it uses, and every letter means the same thing everywhere:

- B: sequences in a (micro-)batch
- S: positions of a sequence (a tensor-parallel shard where a file says so)
- T: tokens, B x S (of this rank)
- D: model dim
- V: vocabulary
- H: query heads
- J: key/value heads (each serves H / J query heads)
- Q: query/key channels per head
- U: value channels per head
- R: rotary channels per head
- A: key/value positions an attention reads (S; the whole sequence for a context-parallel
  rank's queries)
- F: feed-forward hidden dim (a dense SwiGLU's or one expert's)
- E: experts
- X: local experts of an expert-parallel rank (E / ep)
- W: ranks of a process group (the expert-parallel group)
- K: experts per token (top-k)
- G: expert groups (group-limited routing)
- N: routed (token, expert) copies, T x K
- M: rows of an expert-ordered buffer (the copies, plus padding)
- P: padding multiple of each expert's rows
- C: chunks of a kernel's grid
- L: layers (MoE layers: a row each in the step statistics)
- Z: step-statistic fields (``StepStats``)
- 1: a broadcast dim of size one
"""
