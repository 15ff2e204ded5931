"""The one frozen, validated configuration of a conversion, passed down whole."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from edgeq.quant.int4 import BITS, COMPACT_BITS, GRIDS, Granularity
from edgeq.saliency import SALIENCY_METHODS

ACCURACY_LEVELS = (0, 1, 2, 3, 4)
POOLING_CHOICES = ("none", "mean", "cls", "max")  # --pooling of a plain encoder (edgeq.model.sentence)


@dataclass(frozen=True)
class ConvertConfig:
    method: str = "svd"  # saliency method (registry name)
    k: int = 256  # FP32 entries per Linear
    budget: float | None = None  # instead of k: fraction of all quantized Linear weights kept FP32, model-wide
    rank: int = 8  # SVD rank r
    seed: int = 0
    block_size: str = "32"  # 16..256, "per-channel" or "per-tensor"
    exclude_salient_from_scale: bool = False
    exclude: tuple[str, ...] = ()  # regexes of Linear names kept FP32
    accuracy_level: int = 0  # MatMulNBits accuracy_level; 0 = FP32 activations, same numbers on every runtime
    bits: int = 4  # bits per Linear weight: 4 (Q4-sym-7), 8 (Q8-sym-127), or 2/3 (stored compact, run at 4)
    grid: str = "sym7"  # sym7 (max/7, the paper's), sym8 (ORT's signed max/8), mse, asym, asym-mse (edgeq.quant.grid)
    bits8: tuple[str, ...] = ()  # regexes of Linear names quantized to 8 bits whatever --bits says
    correction: str = "auto"  # graph encoding of the FP32 correction (edgeq.onnx.corrections.CORRECTION_CHOICES)
    quantize_embeddings: bool = False  # word + nn.Embedding tables of >= 64 rows as 4-bit GatherBlockQuantized
    storage: str = "auto"  # plain (MatMulNBits inputs) or compact (b-bit planes + fp16 scales);
                           # auto: compact below 4 bits
    embedding_bits: int = 4  # bits of the quantized embedding tables: 4 (Q4-sym-7) or 8 (Q8-sym-127)
    kernel: str = "int4"  # int4 (every width runs the 4-bit kernel), native (ONNX Runtime's own 2-bit kernel)
                          # or integer (uint8 dynamic activations x int8 weights: DynamicQuantizeMatMul)
    fuse_qkv: bool = False  # Linears reading one input (q, k, v) → one MatMulNBits + Split (edgeq.onnx.fuse_qkv)
    opset: int = 17
    allow_pickle: bool = False
    external_data_threshold: int = 2_000_000_000  # bytes; larger models use external data
    calib: str | None = None  # calibration data: GLUE task name (train split) or a text/TSV file
    calib_samples: int = 128  # calibration examples (seeded sample, --seed)
    data_dir: str | None = None  # GLUE directory for task names (default: $EDGEQ_GLUE_DIR or ../shared/data/glue)
    percdamp: float = 0.01  # relative Hessian damping (spqr)
    quantizer: str = "rtn"  # int4 quantizer (edgeq.quant.registry): rtn, gptq, sarqc-gbs, sarqc-gs, lsi
    sarqc_lambda: str = "auto"  # SARQC regularisation strength: a float >= 0 or "auto" (held-out choice)
    sarqc_saliency: str = "svd"  # SARQC saliency: svd, magnitude, hessian, uniform
    lsi_epochs: int = 3  # LSI/LWC epochs over the fitting calibration batches (best held-out epoch kept)
    lsi_rank: int = 64  # singular values with a learnable increment (0: LWC only)
    lsi_lr: float = 1e-3  # AdamW lr of the increments δ (docs/quantizers.md: measured choice)
    lwc_lr: float = 1e-1  # AdamW lr of the clipping logits γ, β (OmniQuant's 1e-2 barely moves in ~20 steps)
    pooling: str = "none"  # plain encoders: sentence_embedding in the graph (none, mean, cls, max)
    normalize: bool = False  # plain encoders with --pooling: L2-normalise the sentence embedding
    act_outliers: int = 0  # --kernel integer: input columns of largest calibration max|x| per Linear kept FP32
    act_outlier_ratio: float = 0.0  # ... only those with max|x_j| >= this x the median column's (0: all N)
    smooth_alpha: float | None = None  # --kernel integer: SmoothQuant migration strength α in (0, 1) (None: off)
    smooth_layers: tuple[str, ...] = ()  # ... regexes of the Linears smoothed (empty: every Linear)
    granularity: Granularity = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method not in SALIENCY_METHODS:
            raise ValueError(
                f"unknown --method {self.method!r}; choose from {', '.join(sorted(SALIENCY_METHODS))}"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"--k must be a non-negative integer, got {self.k!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"--rank must be a positive integer, got {self.rank!r}")
        self._check_budget()
        object.__setattr__(self, "granularity", Granularity.parse(self.block_size))
        object.__setattr__(self, "block_size", str(self.granularity))
        if SALIENCY_METHODS[self.method].needs_calibration and not self.calib:
            raise ValueError(f"--method {self.method} needs calibration data; "
                             "pass --calib TASK_OR_FILE (e.g. --calib rte)")
        if isinstance(self.calib_samples, bool) or not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise ValueError(f"--calib-samples must be a positive integer, got {self.calib_samples!r}")
        if self.pooling not in POOLING_CHOICES:
            raise ValueError(f"unknown --pooling {self.pooling!r}; choose from {', '.join(POOLING_CHOICES)}")
        if self.normalize and self.pooling == "none":
            raise ValueError("--normalize needs --pooling (mean, cls or max): it normalises the sentence embedding")
        if not self.percdamp >= 0:
            raise ValueError(f"--percdamp must be >= 0, got {self.percdamp!r}")
        from edgeq.quant.registry import check_options

        check_options(self)
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"--accuracy-level must be one of {ACCURACY_LEVELS}, got {self.accuracy_level}")
        if self.opset < 17:
            raise ValueError("--opset must be at least 17 (ScatterElements with reduction, LayerNormalization)")
        if self.bits not in BITS:
            raise ValueError(f"--bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")
        self._check_storage()
        if self.embedding_bits not in (4, 8):
            raise ValueError(f"--embedding-bits must be 4 or 8, got {self.embedding_bits!r}")
        if self.grid not in GRIDS:
            raise ValueError(f"--grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if self.bits == 8 and self.grid != "sym7":
            raise ValueError(f"--grid {self.grid} is for 2-4 bits; 8-bit codes use sym7 (drop --grid or use --bits 4)")
        if self.grid.startswith("asym") and self.kernel == "native":
            raise ValueError(f"--grid {self.grid} needs zero points, which the native 2-bit layout is written "
                             "without here; use --kernel int4")
        from edgeq.onnx.corrections import CORRECTION_CHOICES

        if self.correction not in CORRECTION_CHOICES:
            raise ValueError(f"unknown --correction {self.correction!r}; choose from {', '.join(CORRECTION_CHOICES)}")
        for option, patterns in (("--exclude", self.exclude), ("--bits8", self.bits8),
                                 ("--smooth-layers", self.smooth_layers)):
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{option} {pattern!r} is not a valid regular expression: {e}") from None

    def _check_budget(self) -> None:
        if self.budget is not None:
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1:
                raise ValueError(f"--budget must be a fraction in [0, 1) (e.g. 0.01), got {b!r}")
            if self.k != ConvertConfig.__dataclass_fields__["k"].default:
                raise ValueError("--budget and --k are mutually exclusive; drop --k (the budget sets k per layer)")
        if SALIENCY_METHODS[self.method].exclude_salient_from_scale:  # the selection assumed it
            object.__setattr__(self, "exclude_salient_from_scale", True)

    def _check_storage(self) -> None:
        from edgeq.onnx.storage import KERNELS, STORAGES

        if self.kernel not in KERNELS:
            raise ValueError(f"unknown --kernel {self.kernel!r}; choose from {', '.join(KERNELS)}")
        if self.storage == "auto":
            compact = self.bits in COMPACT_BITS and self.kernel == "int4"
            object.__setattr__(self, "storage", "compact" if compact else "plain")
        if self.storage not in STORAGES:
            raise ValueError(f"unknown --storage {self.storage!r}; choose from auto, {', '.join(STORAGES)}")
        if self.kernel == "native" and self.bits != 2:
            raise ValueError(f"--kernel native runs ONNX Runtime's own 2-bit MatMulNBits, so it needs --bits 2 "
                             f"(there is no {self.bits}-bit native kernel here); use --kernel int4")
        if self.kernel == "native" and self.storage == "compact":
            raise ValueError("--kernel native stores ONNX Runtime's own 2-bit layout; drop --storage compact")
        if self.bits in COMPACT_BITS and self.kernel == "int4" and self.storage != "compact":
            raise ValueError(f"--bits {self.bits} is stored compact and run by the 4-bit kernel; "
                             "use --storage compact (or auto), or --kernel native for 2 bits")
        from edgeq.quant.registry import GRID_QUANTIZERS

        if self.storage == "compact" and self.quantizer not in GRID_QUANTIZERS:
            raise ValueError(f"--storage compact (and --bits 2/3) needs float16 scales, which --quantizer "
                             f"{self.quantizer} does not plan; use --quantizer {'/'.join(GRID_QUANTIZERS)}")
        if (self.kernel == "integer" or self.act_outliers or self.act_outlier_ratio or self.smooth_alpha is not None
                or self.smooth_layers):
            self._check_integer()
        if self.storage == "compact" and self.bits == 8 and self.kernel != "integer":
            raise ValueError("--storage compact holds 2, 3 or 4 bits per weight; use --bits 2, 3 or 4 "
                             "(--bits8 layers stay plain), or --kernel integer (7-bit weights)")

    def _check_integer(self) -> None:
        """--kernel integer: 8-bit per-channel RTN weights, activations quantized by the kernel itself."""
        if isinstance(self.act_outliers, bool) or not isinstance(self.act_outliers, int) or self.act_outliers < 0:
            raise ValueError(f"--act-outliers must be a non-negative integer, got {self.act_outliers!r}")
        if not self.act_outlier_ratio >= 0:
            raise ValueError(f"--act-outlier-ratio must be >= 0, got {self.act_outlier_ratio!r}")
        if self.kernel != "integer":
            if not (self.act_outliers or self.act_outlier_ratio):
                raise ValueError("--smooth-alpha rescales the integer kernel's activations; "
                                 "use it with --kernel integer --bits 8")
            raise ValueError("--act-outliers keeps activation columns out of the integer kernel; "
                             "use it with --kernel integer --bits 8")
        if self.act_outliers and not self.calib:
            raise ValueError("--act-outliers picks columns by calibration max|x|; pass --calib TASK_OR_FILE")
        if self.smooth_alpha is not None:
            a = self.smooth_alpha
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1:
                raise ValueError(f"--smooth-alpha must be a fraction in (0, 1) (e.g. 0.5), got {a!r}")
            if not self.calib:
                raise ValueError("--smooth-alpha scales columns by calibration max|x|; pass --calib TASK_OR_FILE")
        elif self.smooth_layers:
            raise ValueError("--smooth-layers picks the Linears --smooth-alpha smooths; pass --smooth-alpha A too")
        if self.bits != 8:
            raise ValueError(f"--kernel integer runs int8 weights (DynamicQuantizeMatMul); use --bits 8, "
                             f"not --bits {self.bits}")
        if self.granularity.kind == "block":
            raise ValueError("--kernel integer has one weight scale per output channel; "
                             "use --block-size per-channel (or per-tensor)")
        if self.quantizer != "rtn":
            raise ValueError(f"--kernel integer is implemented for --quantizer rtn only, not {self.quantizer}")
        if self.accuracy_level != 0:
            raise ValueError("--accuracy-level is a MatMulNBits setting; --kernel integer always quantizes "
                             "activations to uint8, so drop --accuracy-level")

    @property
    def fp16_scales(self) -> bool:
        """Plans use float16 scales when the file stores them (compact storage)."""
        return self.storage == "compact"

    def layer_grid(self, layer: str) -> tuple[int, str, bool]:
        """(bits, grid, float16 scales) of ``layer``: --bits8 layers are Q8-sym-127 with float32 scales."""
        bits = self.layer_bits(layer)
        return (8, "sym7", False) if bits == 8 else (bits, self.grid, self.fp16_scales)

    def layer_bits(self, layer: str) -> int:
        """8 when ``--bits8`` matches ``layer``, else ``--bits``."""
        return 8 if any(re.search(p, layer) for p in self.bits8) else self.bits

    def is_smoothed(self, layer: str) -> bool:
        """``--smooth-alpha`` applies to ``layer`` (every Linear unless ``--smooth-layers`` narrows it)."""
        return self.smooth_alpha is not None and (not self.smooth_layers
                                                  or any(re.search(p, layer) for p in self.smooth_layers))

    def is_excluded(self, layer: str) -> bool:
        return any(re.search(p, layer) for p in self.exclude)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("granularity", None)
        d["exclude"] = list(self.exclude)
        return d
