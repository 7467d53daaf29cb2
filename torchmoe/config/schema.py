"""The job configuration: one dataclass per TOML section.

Key names follow torchtitan's TOML where one exists and Megatron-Core's MoE flags (without the
``moe_`` prefix, since they live in ``[moe]``) so users can move recipes over unchanged. Each field
carries its help text and its allowed range, which the loader checks and ``--help`` prints.
Keys marked "from the flavor" are filled by ``model.flavor`` unless the recipe or CLI sets them.
"""

from dataclasses import dataclass, field, fields
from typing import Any


def opt(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> Any:
    """A config field with its help text and the range the loader enforces."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Job:
    dump_folder: str = opt("./outputs", "Folder for checkpoints, metrics and TensorBoard logs.")
    description: str = opt("", "Free text, printed at start.")


@dataclass
class Model:
    name: str = opt("deepseek_v3", "Model family (see torchmoe/config/registry.py).")
    flavor: str = opt("debug", "Named size of the family; its values fill every key not set.")
    tokenizer_path: str = opt(
        "bundled",
        "'bundled' (the BPE shipped in the repo), a tiktoken ranks file, or a "
        "tiktoken encoding name such as cl100k_base (needs the network once).",
    )
    vocab_size: int = opt(4224, "Embedding rows; must be >= the tokenizer's vocabulary.", gt=0)
    dim: int = opt(256, "Hidden size.", gt=0)
    n_layers: int = opt(3, "Transformer blocks.", gt=0)
    n_dense_layers: int = opt(1, "The first n blocks use a dense SwiGLU instead of MoE.", ge=0)
    n_heads: int = opt(4, "Attention heads.", gt=0)
    n_kv_heads: int = opt(4, "GQA key/value heads (GQA families; divides n_heads).", gt=0)
    head_dim: int = opt(64, "GQA per-head dim (GQA families).", gt=0)
    inter_dim: int = opt(512, "Hidden size of the dense SwiGLU layers.", gt=0)
    q_lora_rank: int = opt(0, "MLA query low-rank dim; 0 projects queries directly.", ge=0)
    kv_lora_rank: int = opt(64, "MLA compressed key/value dim.", gt=0)
    qk_nope_head_dim: int = opt(32, "Per-head query/key dim without rotary embedding.", gt=0)
    qk_rope_head_dim: int = opt(16, "Per-head query/key dim with rotary embedding (even).", gt=0)
    v_head_dim: int = opt(32, "Per-head value dim.", gt=0)
    norm_eps: float = opt(1e-6, "RMSNorm epsilon.", gt=0)
    rope_theta: float = opt(10000.0, "RoPE base.", gt=0)
    rope_factor: float = opt(1.0, "YaRN context-extension factor; 1 disables YaRN.", ge=1)
    rope_original_seq_len: int = opt(4096, "YaRN: the context length of pre-training.", gt=0)
    rope_beta_fast: float = opt(32.0, "YaRN: fast correction boundary (rotations).", gt=0)
    rope_beta_slow: float = opt(1.0, "YaRN: slow correction boundary (rotations).", gt=0)
    rope_mscale: float = opt(1.0, "YaRN: attention temperature coefficient.", ge=0)
    attn_mask: str = opt(
        "causal",
        "'causal': a token sees every earlier token of its packed row; 'block_causal': only "
        "those of its own document (packed documents do not attend to each other; flex "
        "attention on CUDA).",
        choices=("causal", "block_causal"),
    )
    init_std: float = opt(0.02, "Std of the truncated-normal init of input projections.", gt=0)
    mtp_num_layers: int = opt(
        0,
        "Multi-token prediction depth (DeepSeek-V3): extra blocks that each predict one "
        "more token ahead; 0 = off.",
        ge=0,
    )
    mtp_loss_scale: float = opt(0.1, "Weight of the mean multi-token prediction loss.", ge=0)


@dataclass
class MoE:
    num_experts: int = opt(
        8, "Routed experts per MoE layer; 0 = a dense model (every block a SwiGLU MLP).", ge=0
    )
    layer_freq: list[int] = opt(
        [1],
        "Which blocks are MoE: an int n (every n-th block, counting from block 0) or a "
        "0/1 list with one entry per block, e.g. [0,1,1,1]. Blocks before model.n_dense_layers "
        "stay dense either way.",
    )
    router_topk: int = opt(2, "Experts each token is sent to.", gt=0)
    ffn_hidden_size: int = opt(128, "Hidden size of each routed expert.", gt=0)
    shared_expert_intermediate_size: int = opt(
        128, "Total hidden size of the shared experts (e.g. 2 x 1408); 0 = none.", ge=0
    )
    shared_expert_overlap: bool = opt(
        False,
        "Compute the shared experts while the expert-parallel dispatch's all-to-all (or "
        "all-gather) is in flight, so they hide it (Megatron's --moe-shared-expert-overlap); "
        "the same arithmetic. Not with op-level selective checkpointing.",
    )
    router_score_function: str = opt("sigmoid", "Router scores.", choices=("softmax", "sigmoid"))
    router_pre_softmax: bool = opt(
        True,
        "Softmax scores: softmax over all experts, then top-k (true), or top-k on the "
        "logits, then softmax over the k chosen (false; Megatron's default).",
    )
    router_norm_topk_prob: bool = opt(True, "Renormalise the top-k weights to sum to 1.")
    router_topk_scaling_factor: float = opt(
        1.0, "Routed scaling factor on the top-k weights.", gt=0
    )
    router_num_groups: int = opt(0, "Group-limited routing: expert groups (0 = off).", ge=0)
    router_group_topk: int = opt(0, "Group-limited routing: groups each token may use.", ge=0)
    router_dtype: str = opt("fp32", "Precision of the router math.", choices=("fp32", "fp64"))
    load_balancing_type: list[str] = opt(
        ["none"],
        "Balancing methods, combinable: aux_loss (Switch/GShard, over the micro-batch), "
        "seq_aux_loss (per sequence, DeepSeek-V2/V3), global_aux_loss (expert counts over all "
        "data-parallel ranks' micro-batches), sinkhorn (S-BASE selection, no loss; alone), none.",
        choices=("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"),
    )
    aux_loss_coeff: list[float] = opt(
        [0.0],
        "Weight of each balance loss in load_balancing_type (one value for all, or one per type).",
        ge=0,
    )
    z_loss_coeff: float = opt(
        0.0, "Router z-loss weight (mean squared logsumexp of the logits, ST-MoE); 0 = off.", ge=0
    )
    input_jitter_eps: float = opt(
        0.0,
        "Multiply router inputs by uniform noise in [1 - eps, 1 + eps] in training "
        "(Switch); 0 = off.",
        ge=0,
        le=1,
    )
    enable_expert_bias: bool = opt(
        True, "Aux-loss-free balancing: a per-expert bias that only affects expert selection."
    )
    bias_update_rate: float = opt(1e-3, "Expert-bias step after each optimizer step.", ge=0)
    force_load_balance: bool = opt(
        False,
        "Benchmark mode: ignore the scores and assign experts round-robin, the best "
        "case for speed. Never for real training.",
    )
    capacity_factor: float = opt(
        0.0,
        "Token dropping: each expert takes at most capacity_factor x T x K / E copies "
        "of its T local tokens; the rest skip the experts (residual only). 0 = dropless.",
        ge=0,
    )
    eval_capacity_factor: float = opt(
        -1.0,
        "Capacity factor in evaluation (validation, generation); -1 = capacity_factor, "
        "0 = dropless (DeepSpeed's eval_capacity_factor).",
        ge=-1,
    )
    min_capacity: int = opt(
        0, "Capacity mode: every expert takes at least this many copies (DeepSpeed's).", ge=0
    )
    drop_policy: str = opt(
        "probs",
        "Capacity mode: per expert, keep the copies with the "
        "highest router weight (probs) or the earliest (position).",
        choices=("probs", "position"),
    )
    pad_to_capacity: bool = opt(
        False,
        "Capacity mode: pad every expert's group to exactly its capacity (static GEMM shapes).",
    )
    freeze_experts: list[int] = opt(
        [], "Expert ids whose routed-expert weights do not train (in every MoE layer)."
    )
    freeze_router: bool = opt(False, "Do not train the router gates.")
    dispatcher: str = opt(
        "alltoall",
        "Expert-parallel token exchange: all-to-all of the routed copies (one host sync "
        "per layer for the sizes); sync_free: all-to-all of fixed-size blocks per (rank, "
        "expert), no host sync (dropless: E x tokens rows; with moe.capacity_factor and "
        "moe.pad_to_capacity: the capacity); or all-gather of all tokens + reduce-scatter "
        "(small groups, large top-k).",
        choices=("alltoall", "sync_free", "allgather"),
    )
    grouped_mm: str = opt(
        "auto",
        "Expert GEMMs: torch._grouped_mm, a per-expert loop, or auto (grouped_mm on "
        "CUDA sm90+, loop elsewhere).",
        choices=("auto", "grouped_mm", "loop"),
    )
    permute_backend: str = opt(
        "auto",
        "Token permutation (dispatch gather, combine weighted sum): fused Triton "
        "kernels, plain torch ops, or auto (Triton on CUDA, torch elsewhere).",
        choices=("auto", "triton", "torch"),
    )


@dataclass
class Training:
    steps: int = opt(300, "Optimizer steps to train.", gt=0)
    seed: int = opt(42, "Seed for init, data order and everything random.", ge=0)
    seq_len: int = opt(128, "Tokens per sequence.", gt=0)
    local_batch_size: int = opt(8, "Sequences per micro-batch on each rank.", gt=0)
    global_batch_size: int = opt(
        -1,
        "Sequences per optimizer step over all ranks; more than local x data-parallel "
        "ranks means gradient accumulation. -1 = no accumulation.",
        ge=-1,
    )
    max_norm: float = opt(1.0, "Gradient clipping norm; 0 disables clipping.", ge=0)
    mixed_precision_param: str = opt(
        "auto",
        "Compute dtype (FSDP's parameter dtype wherever FSDP runs, i.e. more than one rank "
        "per pipeline stage; autocast otherwise): auto = bfloat16 on CUDA, float32 on CPU.",
        choices=("auto", "bfloat16", "float32"),
    )
    mixed_precision_reduce: str = opt(
        "float32", "FSDP gradient reduction dtype.", choices=("float32", "bfloat16")
    )
    compute_weights: str = opt(
        "auto",
        "Where one process's bfloat16 compute gets its weights (FSDP casts them itself when it "
        "runs): cast = autocast casts the float32 weights in every forward and their gradients "
        "back in every backward; cached = bfloat16 copies kept beside the float32 weights, "
        "written by torchmoe's AdamW in its update, gradients kept bfloat16 (summed in float32 "
        "over micro-batches), the same arithmetic with 12 fewer bytes of memory traffic per "
        "parameter; auto = cached where it applies (one process, bfloat16 autocast, torchmoe's "
        "AdamW, no float8, no moe.freeze_experts), else cast.",
        choices=("auto", "cached", "cast"),
    )
    grads_per_fold: int = opt(
        2,
        "Under accumulation with cached weights: how many micro-batches' bfloat16 gradients "
        "wait to be added to the float32 sums in one pass. Each pass reads and writes the sums "
        "once, so more per pass is less memory traffic; each waiting gradient holds 2 bytes a "
        "parameter. Set it to the accumulation steps (up to 8) where memory allows.",
        ge=1,
        le=8,
    )
    deterministic: bool = opt(False, "Use deterministic algorithms (slower on GPU).")


@dataclass
class Optimizer:
    name: str = opt("AdamW", "Optimizer.", choices=("AdamW",))
    lr: float = opt(3e-3, "Peak learning rate.", gt=0)
    beta1: float = opt(0.9, "Adam beta1.", ge=0, le=1)
    beta2: float = opt(0.95, "Adam beta2.", ge=0, le=1)
    eps: float = opt(1e-8, "Adam epsilon.", gt=0)
    weight_decay: float = opt(0.1, "Decoupled weight decay (never on norms or biases).", ge=0)
    implementation: str = opt(
        "auto",
        "torchmoe = one Triton kernel per parameter with gradient clipping folded in (plain "
        "torch without Triton); fused, foreach, for-loop = torch.optim.AdamW's. auto = "
        "torchmoe on CUDA or with bfloat16 moments, foreach elsewhere.",
        choices=("auto", "torchmoe", "fused", "foreach", "for-loop"),
    )
    state_dtype: str = opt(
        "float32",
        "dtype of Adam's moments (parameters stay float32): bfloat16 halves the optimizer "
        "state's memory and traffic (needs implementation torchmoe or auto); with beta2 near 1 "
        "(0.999) bfloat16 rounding stalls the second moment's decay, keep float32 there.",
        choices=("float32", "bfloat16"),
    )


@dataclass
class LRScheduler:
    warmup_steps: int = opt(20, "Linear warm-up steps.", ge=0)
    decay_type: str = opt(
        "cosine", "Decay after warm-up.", choices=("cosine", "linear", "constant")
    )
    decay_ratio: float = opt(
        -1.0,
        "Fraction of steps that decay (the rest after warm-up stays at peak, WSD style); "
        "-1 = all steps after warm-up.",
        ge=-1,
        le=1,
    )
    min_lr_factor: float = opt(0.1, "Final LR as a fraction of the peak.", ge=0, le=1)


@dataclass
class Data:
    dataset: str = opt(
        "stdlib_docs",
        "'stdlib_docs' (offline, generated from Python's standard library), "
        "c4, fineweb, an HF hub name, or a local .txt/.json/.jsonl/.parquet file or folder.",
    )
    dataset_config: str = opt("", "HF dataset config name (e.g. 'en' for c4).")
    split: str = opt("train", "Dataset split.")
    text_field: str = opt("text", "Column holding the document text (format = 'text').")
    format: str = opt(
        "text",
        "text: documents, every token a label. prompt_completion: records with 'prompt' and "
        "'completion', the loss on the completion only. chat: records with 'messages' (role, "
        "content) rendered by the tokenizer's chat template, the loss on assistant turns only.",
        choices=("text", "prompt_completion", "chat"),
    )
    streaming: bool = opt(
        True,
        "Stream HF hub datasets instead of downloading them whole "
        "(local files are always read whole).",
    )
    cache_dir: str = opt(
        "",
        "Where generated data (and, when set, HF datasets' cache under "
        "<cache_dir>/huggingface) is kept; '' = ~/.cache/torchmoe.",
    )
    max_bad_fraction: float = opt(
        0.001,
        "Rows without a usable document (not UTF-8, not JSON, no or non-text text_field, "
        "empty) are skipped and counted; when a rank's count exceeds this fraction of its rows "
        "by more than chance allows (3 standard deviations + 10 rows) the run stops, naming "
        "the file, row and reason; 0 = stop at the first bad row.",
        ge=0,
        le=0.5,
    )
    prefetch_batches: int = opt(
        2,
        "Batches tokenized and packed ahead of the step in a background thread; 0 = made "
        "on demand in the training thread.",
        ge=0,
    )


@dataclass
class Checkpoint:
    enable: bool = opt(False, "Save checkpoints and resume from the latest one.")
    folder: str = opt("checkpoint", "Checkpoint folder, relative to job.dump_folder.")
    interval: int = opt(500, "Save every n steps (and at the last step).", gt=0)
    load_step: int = opt(-1, "Resume from this step; -1 = the latest checkpoint, if any.", ge=-1)
    keep_latest_k: int = opt(
        0,
        "Keep only the newest k checkpoints; 0 = keep all. Pruning removes only steps older than "
        "the one just saved, never the seed (step-0).",
        ge=0,
    )
    discard_newer: bool = opt(
        False,
        "Resuming from checkpoint.load_step while newer steps exist: move those steps into "
        "<folder>/discarded/ (nothing is deleted) instead of refusing to start.",
    )
    on_corrupt: str = opt(
        "refuse",
        "The latest checkpoint fails its manifest check (a file missing, cut short or "
        "changed): refuse to start, naming the newest good step, or fallback: move the damaged "
        "steps into <folder>/damaged/ and resume from the newest good one.",
        choices=("refuse", "fallback"),
    )
    async_mode: str = opt(
        "disabled",
        "disabled: training waits while a checkpoint is written. async: the state is copied "
        "to host memory (pinned on GPU) and written by a background thread while training "
        "goes on; its manifest follows when the write completes.",
        choices=("disabled", "async"),
    )
    initial_load_path: str = opt(
        "",
        "A checkpoint step folder (another run's step-N, or step-0 of an HF import) to start "
        "from while checkpoint.folder holds no checkpoint: its weights at step 0 with a fresh "
        "LR schedule and data; later resumes use this run's own checkpoints.",
    )
    initial_load_model_only: bool = opt(
        True,
        "With false, initial_load_path's optimizer moments load too (the step, LR schedule "
        "and data still start fresh).",
    )
    create_seed_checkpoint: bool = opt(
        False,
        "Initialise the model on one rank, save it as step-0 and exit. Runs that find "
        "only step-0 load its weights, so every parallel layout starts from the same model.",
    )
    exclude_from_loading: list[str] = opt(
        [],
        "Parts of the checkpoint not to restore on resume: dataloader (read the data "
        "afresh, e.g. after changing the data-parallel size), rng.",
        choices=("dataloader", "rng"),
    )


@dataclass
class Metrics:
    log_freq: int = opt(10, "Log every n steps.", gt=0)
    enable_tensorboard: bool = opt(False, "Write TensorBoard scalars (needs tensorboard).")
    enable_wandb: bool = opt(
        False,
        "Log the same scalars and the resolved config to Weights & Biases (needs wandb; "
        "WANDB_MODE=offline writes under job.dump_folder/wandb). A resumed job continues its "
        "W&B run.",
    )
    wandb_project: str = opt("torchmoe", "W&B project.")
    wandb_run_name: str = opt("", "W&B run name; '' = the name of job.dump_folder.")
    wandb_tags: list[str] = opt([], "W&B run tags.")
    save_tb_folder: str = opt("tb", "TensorBoard folder, relative to job.dump_folder.")
    save_jsonl: bool = opt(
        True,
        "Append each log line to job.dump_folder/metrics.jsonl "
        "(rank 0 writes it, and the TensorBoard files).",
    )
    collapse_max_over_mean: float = opt(
        4.0,
        "Collapse warning: an MoE layer whose busiest expert gets more than this many times "
        "the mean load over a log window; 0 = not checked.",
        ge=0,
    )
    collapse_dead_fraction: float = opt(
        0.25,
        "Collapse warning: an MoE layer where at least this fraction of its experts got no "
        "token in a log window; 0 = not checked.",
        ge=0,
        le=1,
    )
    collapse_log_lines: int = opt(
        3,
        "Warn when either collapse condition holds for this many log lines in a row; 0 = never.",
        ge=0,
    )


@dataclass
class Parallelism:
    dp_replicate: int = opt(1, "Data-parallel replicas (HSDP outer dimension).", gt=0)
    dp_shard: int = opt(-1, "FSDP shard degree; -1 = the ranks left over.", ge=-1)
    tp: int = opt(1, "Tensor-parallel degree.", gt=0)
    pp: int = opt(1, "Pipeline-parallel degree.", gt=0)
    ep: int = opt(1, "Expert-parallel degree.", gt=0)
    etp: int = opt(1, "Expert tensor-parallel degree.", gt=0)
    cp: int = opt(
        1,
        "Context-parallel degree: each sequence split over cp ranks (2 x cp chunks), "
        "attention over all of it.",
        gt=0,
    )
    pp_schedule: str = opt(
        "1F1B",
        "Pipeline schedule of torch.distributed.pipelining, named as torch names it: "
        "GPipe, 1F1B (one stage per rank); Interleaved1F1B, LoopedBFS, InterleavedZeroBubble "
        "(stages looped over the ranks); ZBVZeroBubble, DualPipeV (two stages per rank in a V).",
        choices=(
            "GPipe",
            "1F1B",
            "Interleaved1F1B",
            "LoopedBFS",
            "InterleavedZeroBubble",
            "ZBVZeroBubble",
            "DualPipeV",
        ),
    )
    pp_ep_overlap: bool = opt(
        False,
        "DualPipeV only: in its overlapped steps, run one micro-batch's forward and another's "
        "backward as two threads taking turns at each expert-parallel all-to-all, so each "
        "exchange runs behind the other micro-batch's compute (needs ep > 1, the alltoall "
        "or sync_free dispatcher, compile off).",
    )
    pp_microbatches: int = opt(
        0,
        "Pipeline micro-batches per local batch, which they split evenly; 0 = one per "
        "sequence (training.local_batch_size).",
        ge=0,
    )
    pp_stages_per_rank: int = opt(
        0,
        "Pipeline stages each pp rank holds (virtual stages); 0 = from pp_layout or "
        "pp_layers_per_stage when set, else 1 for GPipe/1F1B and 2 for the others.",
        ge=0,
    )
    pp_layers_per_stage: int = opt(
        0,
        "Transformer blocks in every pipeline stage (n_layers / this stages in all); 0 = "
        "split by cost (parameters and FLOPs) or by pp_layout.",
        ge=0,
    )
    pp_layout: list[int] = opt(
        [],
        "Transformer blocks of each pipeline stage in order, e.g. [3, 4, 4, 3]: its length "
        "is the stage count (a multiple of pp). The embedding goes with the first stage, the "
        "final norm and output head with the last. Empty = split by cost.",
    )
    plan: str = opt(
        "",
        "Parallelize function 'package.module:function' with the signature of "
        "torchmoe.parallel.plans.parallelize; '' = the model's own plan.",
    )
    fsdp_reshard_after_forward: str = opt(
        "default",
        "Free gathered FSDP weights after forward: default (all but the last "
        "block; never under pipeline parallelism), always, or never (keeps them for backward, "
        "ZeRO-2 style).",
        choices=("default", "always", "never"),
    )
    fsdp_cpu_offload: bool = opt(
        False,
        "Keep sharded parameters, gradients and optimizer "
        "state in CPU memory (FSDP CPUOffloadPolicy).",
    )


@dataclass
class ActivationCheckpoint:
    mode: str = opt(
        "none",
        "Recompute activations in backward: none; full (whole blocks); selective "
        "(op-level policy, or the modules in recompute_modules).",
        choices=("none", "full", "selective"),
    )
    every_n_layers: int = opt(
        1, "Checkpoint one block of every n (1 = all); the rest keep their activations.", gt=0
    )
    recompute_modules: list[str] = opt(
        [],
        "mode = selective: recompute only these modules (Megatron names: core_attn, "
        "mla_up_proj, layernorm, mlp, moe, moe_act). Empty = op-level policy that saves "
        "matmul, attention, top-k and communication outputs and recomputes the rest.",
    )
    offload_modules: list[str] = opt(
        [],
        "Copy what these modules (recompute_modules' names) save for backward to pinned host "
        "memory on a side stream, and back ahead of backward: memory for PCIe traffic instead "
        "of recompute. Every block; with mode none or module recompute (not inside a "
        "recomputed module); the modules run eagerly under compile.",
    )


@dataclass
class Compile:
    enable: bool = opt(False, "torch.compile each transformer block and the loss.")


@dataclass
class Quantize:
    float8_linear: bool = opt(
        False, "Train dense linears in float8 through torchao (needs an sm89+ GPU to be fast)."
    )
    float8_recipe: str = opt(
        "tensorwise",
        "torchao float8 scaling recipe (float8_linear_weight_grad = float8).",
        choices=("tensorwise", "rowwise"),
    )
    float8_linear_weight_grad: str = opt(
        "float8",
        "The dense linears' weight-gradient GEMM under float8_linear: float8 = torchao's "
        "Float8Linear for all three GEMMs (float8_recipe; it casts the float32 weights, so "
        "cached weights turn off); bfloat16 = torchmoe's: forward and input gradient in float8 "
        "with rowwise scales, the weight gradient in bf16 (weights stay plain, so cached "
        "weights apply).",
        choices=("float8", "bfloat16"),
    )
    float8_experts: bool = opt(
        False,
        "Train the routed experts' grouped GEMMs in float8 (rowwise scales; needs CUDA sm90+).",
    )
    float8_experts_weight_grad: str = opt(
        "float8",
        "The experts' weight-gradient GEMM under float8_experts: float8 = torchao's float8 "
        "grouped GEMM for all three GEMMs (per-group column-wise scales for the weight "
        "gradient); bfloat16 = torchmoe's: forward and input gradient in float8, the weight "
        "gradient a bf16 grouped GEMM (no per-group scaling pass; weights stay plain tensors, "
        "so cached weights apply).",
        choices=("float8", "bfloat16"),
    )
    float8_exclude: list[str] = opt(
        ["output", "router"], "Modules whose name contains one of these stay in high precision."
    )


@dataclass
class Validation:
    enable: bool = opt(False, "Measure the loss on held-out data every freq steps.")
    dataset: str = opt(
        "",
        "Validation documents: a local file or folder, a hub name, or '' for a share of "
        "the training dataset held out from training (holdout_fraction).",
    )
    holdout_fraction: float = opt(
        0.01, "With dataset = '': the share of training documents held out.", gt=0, le=0.5
    )
    freq: int = opt(100, "Validate every n steps (and after the last).", gt=0)
    steps: int = opt(10, "Batches per validation: the same batches every time.", gt=0)


@dataclass
class Profiling:
    enable_profiling: bool = opt(
        False,
        "Write a chrome trace (torch profiler) of active_steps steps every freq steps to "
        "job.dump_folder/<save_folder>.",
    )
    freq: int = opt(100, "Steps between traces.", gt=0)
    warmup_steps: int = opt(1, "Profiler warm-up steps before each traced window.", ge=0)
    active_steps: int = opt(2, "Steps each trace covers.", gt=0)
    ranks: str = opt("lead", "Ranks that trace: the lead rank, or all.", choices=("lead", "all"))
    save_folder: str = opt("profile", "Folder for traces and snapshots, in job.dump_folder.")
    enable_memory_snapshot: bool = opt(
        False,
        "Record CUDA allocations and write a memory snapshot after memory_snapshot_step and "
        "when a step runs out of memory (CUDA only; view at pytorch.org/memory_viz).",
    )
    memory_snapshot_step: int = opt(3, "The step after which the snapshot is written.", gt=0)


@dataclass
class Comm:
    init_timeout_s: float = opt(
        600,
        "Seconds a rank may go without progress until its first step ends (building, "
        "compiling, loading) and while saving a checkpoint; then the job ends, naming the "
        "ranks that stopped answering (exit status 3).",
        gt=0,
    )
    train_timeout_s: float = opt(
        300,
        "Seconds a rank may go without finishing a step, after the first; then the job ends "
        "as above. The process group's own timeout is set 60 s above both, as a backstop.",
        gt=0,
    )


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    moe: MoE = field(default_factory=MoE)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    data: Data = field(default_factory=Data)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    quantize: Quantize = field(default_factory=Quantize)
    comm: Comm = field(default_factory=Comm)
    profiling: Profiling = field(default_factory=Profiling)
    validation: Validation = field(default_factory=Validation)


def section_types() -> dict[str, type]:
    """Section name -> its dataclass, in the order the TOML prints them."""
    return {f.name: f.default_factory for f in fields(JobConfig)}
