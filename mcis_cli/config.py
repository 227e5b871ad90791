"""One typed config for every stage: YAML file + dotted `--set key=value` overrides.

Defaults are the official MCIS values (configs/voc12_vgg16.yaml sets each with its source);
configs/toy.yaml starts from that file and shrinks the recipe for the embedded dataset on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mcis_cli.errors import McisError

DEFAULT_CONFIG = Path("configs/toy.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthCfg(Section):
    """How `mcis pipeline` writes the embedded dataset when data.root does not exist."""

    seed: int = 0
    n_train: int = Field(320, ge=4)
    n_val: int = Field(80, ge=2)
    size: int = Field(96, ge=32)
    n_extra: int = Field(0, ge=0)  # setting 2: extra single-label images
    n_web: int = Field(0, ge=0)  # setting 3: noisy web images


class DataCfg(Section):
    root: str = "data/toy"  # the VOC2012 folder: JPEGImages/, SegmentationClassAug/, ImageSets/
    train_list: str = "train_aug"  # ImageSets/Segmentation/<name>.txt
    val_list: str = "val"
    saliency_dir: str | None = None  # folder under root with <id>.png saliency maps
    extra_lists: list[str] = Field(default_factory=list)  # `<file> <class>` lists, settings 2/3
    workers: int = Field(2, ge=0)
    synth: SynthCfg | None = None  # set for the embedded dataset only

    @field_validator("train_list", "val_list")
    @classmethod
    def _bare_list_name(cls, value: str) -> str:
        return bare_name(value)

    @field_validator("extra_lists")
    @classmethod
    def _bare_list_names(cls, value: list[str]) -> list[str]:
        return [bare_name(v) for v in value]

    @field_validator("saliency_dir")
    @classmethod
    def _inside_root(cls, value: str | None) -> str | None:
        if value is not None and (not value or Path(value).is_absolute() or ".." in Path(value).parts):
            raise ValueError("must be a folder inside data.root, given relative to it, without '..'")
        return value


def bare_name(value: str) -> str:
    """A list name is a file stem in ImageSets/Segmentation: no folder part, so no way out of the root."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise ValueError("must be the bare name of a list in ImageSets/Segmentation (no '/' or '..')")
    return value


class LossWeights(Section):
    cls: float = 1.0  # plain classifier on both images
    coatt: float = 1.0  # co-attention classifier, common labels
    contrast: float = 1.0  # contrastive co-attention, unique labels
    self: float = 1.0  # the flip / 0.75x / 2x self-pairs


class ClassifyCfg(Section):
    method: Literal["mcis", "cam"] = "mcis"
    width: float = Field(1.0, gt=0, le=1)  # channel multiplier of the VGG16 backbone
    batch_norm: bool = False  # BatchNorm after every conv (VGG16-BN); official: none
    blocks: int = Field(5, ge=4, le=5)  # VGG16 conv blocks; 4 stops after conv4_3 (official: 5)
    affinity: Literal["bilinear", "cosine"] = "bilinear"  # co-attention similarity (official: bilinear)
    affinity_temperature: float = Field(0.1, gt=0)  # cosine only
    pretrained: bool = True  # torchvision ImageNet weights (width 1 only)
    input_size: int = Field(256, ge=32)
    batch_size: int = Field(5, ge=1)  # pairs per step (global, across processes)
    epochs: int = Field(15, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"  # official: SGD with Nesterov momentum
    lr: float = Field(1e-3, gt=0)
    lr_mult: list[float] = Field(default_factory=lambda: [1.0, 2.0, 10.0, 20.0])
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_epochs: list[int] = Field(default_factory=lambda: [5, 10])
    decay_factor: float = 0.1
    checkpoint_epoch: int = Field(10, ge=0)  # 0-based epoch whose weights localize uses
    contrastive_from_epoch: int = Field(2, ge=0)
    self_pairs: bool = True
    coattention: bool = True
    contrastive: bool = True
    loss_weights: LossWeights = Field(default_factory=lambda: LossWeights())
    color_jitter: list[float] = Field(default_factory=lambda: [0.3, 0.3, 0.3, 0.1])
    amp: bool = False
    log_every: int = Field(1, ge=1)


class LocalizeCfg(Section):
    method: Literal["mcis", "cam"] = "mcis"
    input_size: int | None = Field(None, ge=32)  # square input; None: the classifier's training size
    partners: int = Field(3, ge=0)  # related images per class, drawn with replacement
    self_pairs: bool = True
    gate: float = 0.1  # a map joins the fusion only if sigmoid(its mean score) > gate
    batch_size: int = Field(8, ge=1)
    feature_batch: int = Field(8, ge=1)  # images per backbone forward of the feature cache, always this many
    cache_mb: int = Field(512, ge=0)  # feature cache budget
    previews: bool = False  # also write PNG heat maps


class OaaTrainCfg(Section):
    """The training recipe OAA's classifier and OAA+'s integral attention model share: single
    images, short side resized, no flip, in list order, SGD with iter_size (docs/method.md "OAA and OAA+")."""

    width: float = Field(1.0, gt=0, le=1)  # channel multiplier of the VGG16 backbone
    batch_norm: bool = False  # BatchNorm after every conv; official: none
    blocks: int = Field(5, ge=4, le=5)  # VGG16 conv blocks; 4 stops after conv4_3 (official: 5)
    pretrained: bool = True  # torchvision ImageNet weights (width 1 only)
    input_size: int = Field(224, ge=32)  # the short side (ResizeShort); the aspect ratio is kept
    batch_size: int = Field(1, ge=1)  # images per forward; > 1 needs images of one shape
    iter_size: int = Field(5, ge=1)  # forwards whose gradients make one optimizer step
    # official: the iter_size counter restarts at each epoch but the gradients of an epoch's last,
    # incomplete step are kept and join the next epoch's first step (false: they are dropped)
    carry_partial_step: bool = True
    epochs: int = Field(15, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(1e-3, gt=0)
    lr_mult: list[float] = Field(default_factory=lambda: [1.0, 2.0, 10.0, 20.0])
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_epochs: list[int] = Field(default_factory=lambda: [10])
    decay_factor: float = 0.1
    color_jitter: list[float] = Field(default_factory=lambda: [0.3, 0.3, 0.3, 0.1])
    amp: bool = False
    log_every: int = Field(1, ge=1)


class AccumulateCfg(OaaTrainCfg):
    """OAA: the classifier, and how its attention maps accumulate during training."""

    start_epoch: int = Field(1, ge=0)  # official: nothing accumulates in the first epoch (epoch 0)
    last_epoch_fallback: bool = True  # a class never accepted takes its map of the last epoch


class IntegralCfg(OaaTrainCfg):
    """OAA+: the integral attention model trained on OAA's cumulative maps."""

    # official: the loss of each forward is not divided by iter_size, so a step sums the
    # gradients of iter_size images (false: divided, as OAA's classifier does)
    loss_sum_over_iter: bool = True
    positive_above: float = Field(0.001, ge=0, lt=1)  # target > this: an "enhanced" (positive) pixel


class RuleOverrides(Section):
    """A method's own pseudo-mask thresholds: the values it sets replace the section's (MCIS's)."""

    background: Literal["saliency", "cam", "walk"] | None = None
    att_thr: float | None = None
    fg_thr: float | None = None
    conflict: float | None = None
    bg_thr: int | None = None
    min_fg: float | None = None
    cam_bg_power: float | None = None
    cam_threshold: float | None = None


# The method (a localization run's `mcis.method` tag) -> the PseudolabelCfg field of its own rule.
METHOD_RULES = {"oaa": "oaa", "oaa+": "oaa"}
METHOD_RULES |= {"psa": "psa"}  # and every `<method>+rw` (refine's walked maps): `rule_of`
WALKED = "+rw"


def rule_of(method: str | None) -> str | None:
    """The PseudolabelCfg field of a method's own rule, if it has one."""
    method = method or ""
    return "psa" if method.endswith(WALKED) else METHOD_RULES.get(method)


class PseudolabelCfg(Section):
    # walk: PSA's, argmax over the walked background and class maps, no saliency
    background: Literal["saliency", "cam", "walk"] = "saliency"
    saliency: Literal["folder", "computed"] = "folder"  # folder = data.saliency_dir; computed: mcis_cli.saliency
    # adaptive: 0/1 at 2 x mean saliency, as near-binary as the DSS maps the official code reads
    binarize: Literal["none", "adaptive"] = "none"
    fill_radius: int = Field(0, ge=0)  # > 0: close the binarised map with a disk this wide (px), fill holes
    att_thr: float = 0.95
    fg_thr: float = 0.3
    conflict: float = 0.99
    bg_thr: int = 32  # on the 0..255 saliency scale
    min_fg: float = 0.01
    cam_bg_power: float = 1.0  # cam background: (1 - max map) ** power
    cam_threshold: float = 0.3  # cam: foreground needs a map value above this
    sweep: list[float] = Field(default_factory=list)  # background thresholds to evaluate
    oaa: RuleOverrides = Field(default_factory=lambda: RuleOverrides(conflict=0.9, att_thr=0.8))  # OAA, OAA+
    psa: RuleOverrides = Field(default_factory=lambda: RuleOverrides(background="walk"))  # PSA, <method>+rw

    @model_validator(mode="after")
    def _fill_needs_binary(self) -> PseudolabelCfg:
        if self.fill_radius and self.binarize == "none":
            raise ValueError("fill_radius closes a binary map: set pseudolabel.binarize=adaptive too")
        return self

    def for_method(self, method: str | None) -> PseudolabelCfg:
        """The thresholds that apply to maps of `method`: the section's, with the method's own
        rule over them where it has one."""
        rule = rule_of(method)
        if rule is None:
            return self
        own = getattr(self, rule).model_dump(exclude_none=True)
        return self.model_validate(self.model_dump() | own)


class SegmentCfg(Section):
    arch: Literal["vgg16", "resnet101"] = "vgg16"
    width: float = Field(1.0, gt=0, le=1)
    batch_norm: bool = False  # vgg16 only: BatchNorm after every body conv; official: none
    blocks: int = Field(5, ge=4, le=5)  # vgg16 only: conv blocks of the body (official: 5)
    pretrained: bool = True
    # a local .pth state dict in this model's own keys (e.g. a converted Caffe vgg16_20M), loaded
    # instead of torchvision's ImageNet file when pretrained; see README "Using real PASCAL VOC"
    weights: str | None = None
    batch_size: int = Field(10, ge=1)
    crop: int = Field(321, ge=16)
    # the crop's scale is one of `scales` (Caffe ImageSegData); empty: uniform over scale_range
    scales: list[float] = Field(default_factory=lambda: [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3])
    scale_range: list[float] = Field(default_factory=lambda: [0.7, 1.3], min_length=2, max_length=2)
    mirror: bool = True
    # images: each image's mean over its valid pixels, averaged over the batch (Caffe, batch 1 x
    # iter_size 10); pixels: the mean over the batch's valid pixels pooled
    loss_norm: Literal["images", "pixels"] = "images"
    iters: int = Field(15000, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_mult_classifier: float = 10.0
    lr_mult_bias: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    dropout: float = Field(0.5, ge=0, lt=1)
    amp: bool = False
    log_every: int = Field(1, ge=1)
    val_every: int = Field(1000, ge=0)  # 0 = no periodic validation
    checkpoint_every: int = Field(1000, ge=1)

    @field_validator("scales", "scale_range")
    @classmethod
    def _positive_scales(cls, value: list[float]) -> list[float]:
        if any(s <= 0 for s in value):
            raise ValueError("scale factors must be > 0")
        return value

    @field_validator("scale_range")
    @classmethod
    def _low_high(cls, value: list[float]) -> list[float]:
        if value[0] > value[1]:
            raise ValueError("must be the low then the high scale")
        return value

    @model_validator(mode="after")
    def _weights_need_pretrained(self) -> SegmentCfg:
        if self.weights is not None and not self.pretrained:
            raise ValueError("segment.weights is the pretrained init: set segment.pretrained=true too")
        return self

    @model_validator(mode="after")
    def _resnet_needs_pretrained(self) -> SegmentCfg:
        # its BatchNorm is frozen (the recipe's): from random init nothing normalises the
        # activations, which grow block after block (logits ~1e4) and the loss goes to nan
        if self.arch == "resnet101" and not self.pretrained:
            raise ValueError("segment.arch=resnet101 trains from ImageNet weights only (its BatchNorm "
                             "is frozen): set segment.pretrained=true, or segment.arch=vgg16 from scratch")
        return self


class CrfCfg(Section):
    pos_sxy: float = 3.0
    pos_compat: float = 1.0
    bi_sxy: float = 80.0
    bi_srgb: float = 4.0
    bi_compat: float = 3.0
    iters: int = Field(1, ge=1)


# ---- PSA (AffinityNet + random walk): configs/voc12_vgg16.yaml cites each official value ------
class PsaTraining(Section):
    """What PSA's two networks share: their shape and their training recipe."""

    width: float = Field(1.0, gt=0, le=1)
    batch_norm: bool = False
    blocks: int = Field(5, ge=4, le=5)
    pretrained: bool = True  # torchvision ImageNet conv weights (width 1 only); conv1-2 then frozen
    crop: int = Field(448, ge=16)
    color_jitter: list[float] = Field(default_factory=lambda: [0.3, 0.3, 0.3, 0.1])
    batch_size: int = Field(16, ge=1)
    epochs: int = Field(15, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    weight_decay: float = 5e-4
    lr_mult: list[float] = Field(default_factory=lambda: [1.0, 2.0, 10.0, 20.0])
    poly_power: float = 0.9
    momentum_bug: bool = True  # the official SGD call's momentum = weight decay (docs/method.md §14.2)
    amp: bool = False
    log_every: int = Field(1, ge=1)


class PsaCfg(PsaTraining):
    """PSA's classifier (`psa_classify`) and its CAMs (`psa_cam`)."""

    scale_range: list[int] = Field(default_factory=lambda: [256, 512], min_length=2, max_length=2)  # long side
    cam_scales: list[float] = Field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0], min_length=1)
    cam_flip: bool = True


class AffinityCfg(PsaTraining):
    """The confident labels and AffinityNet (`affinity`)."""

    alpha_low: float = Field(4.0, gt=0)
    alpha_high: float = Field(32.0, gt=0)
    crf: CrfCfg = Field(default_factory=lambda: CrfCfg(pos_sxy=3, pos_compat=3, bi_sxy=80, bi_srgb=13,
                                                       bi_compat=10, iters=10))
    jobs: int = Field(2, ge=1)  # CRF worker processes
    fc6_dilation: int = Field(4, ge=1)
    radius: int = Field(5, ge=2)
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(8, ge=1)


class RefineCfg(Section):
    """The random walk (`refine`)."""

    alpha: float = Field(16.0, gt=0)  # background (1 - max)^alpha of the walked maps
    beta: float = Field(8.0, gt=0)  # A^beta
    logt: int = Field(8, ge=0)  # t = 2^logt steps, by logt squarings
    radius: int | None = Field(None, ge=2)  # None: the AffinityNet's; another value is refused
    # dense: T^(2^logt) by logt squarings (official); sparse: 2^logt products with a sparse T, the
    # same maps to float tolerance (benchmarks/bench_walk.py), no cells x cells matrix
    walk: Literal["dense", "sparse"] = "dense"
    max_cells: int = Field(12000, ge=1)  # feature cells of one image's dense transition matrix
# ---- end PSA ------------------------------------------------------------------------------


class EvaluateCfg(Section):
    scales: list[float] = Field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])
    flip: bool = True
    crf: bool = True
    crf_params: CrfCfg = Field(default_factory=CrfCfg)
    jobs: int = Field(2, ge=1)  # CRF worker processes
    window: int = Field(401, ge=0)  # sliding-window size; 0 = whole image
    # official: bicubic resizes, every window padded to full size (eval_res.py); bilinear: the
    # image and probabilities resized bilinearly, windows clipped to the image
    upsample: Literal["official", "bilinear"] = "official"
    save_masks: bool = False
    overlays: int = Field(8, ge=0)


class QualityCfg(Section):
    """How outputs are scored against ground truth, wherever a stage reports quality."""

    # background thresholds tried when scoring localization maps (SEAM-style sweep)
    bg_sweep: list[float] = Field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 13)],
                                  min_length=1)


class ExportCfg(Section):
    opset: int = Field(18, ge=11)
    tolerance: float = 1e-3  # max abs logit difference ORT vs PyTorch
    parity_sizes: list[list[int]] = Field(
        default_factory=lambda: [[1, 321, 321], [2, 257, 385], [1, 97, 130]]
    )
    quantize: Literal["none", "dynamic", "static"] = "none"
    # which file the registered model serves: fp16 (for GPUs; float32 inputs and outputs, the
    # casts inside the graph) is checked against PyTorch fp32 by fp16_tolerance, a bound on
    # max |ORT fp16 - PyTorch fp32| / max |PyTorch logit|; int8 needs quantize dynamic or static
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    fp16_tolerance: float = Field(1e-2, gt=0)
    serving: Literal["cpu", "gpu"] = "cpu"  # the served model's onnxruntime package and providers
    # ONNX Runtime settings of the served model, also used by `mcis predict` on a registered one
    # (version tag `onnxruntime`). HEURISTIC: cuDNN picks a convolution algorithm without timing
    # every candidate, which EXHAUSTIVE redoes for each new image size (every photo, here).
    cudnn_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = "HEURISTIC"
    tensorrt: bool = False  # TensorRT first where onnxruntime-gpu has it; needs serving=gpu
    # what the served model accepts, beyond which it answers HTTP 413: pixels of one image (read
    # from the header, before decoding) and the encoded images of one request together, in MB
    max_pixels: int = Field(4096 * 4096, ge=64)
    max_request_mb: float = Field(32.0, gt=0)
    register_model: bool = True
    # the registered model's name: one per task, which every config that trains for it shares
    # (mcis-deeplab: VOC; mcis-deeplab-toy: the embedded data), so that `mcis promote` compares
    # like with like and a demo never writes the name the VOC server serves
    model_name: str = Field("mcis-deeplab", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

    @field_validator("tensorrt")
    @classmethod
    def _tensorrt_needs_gpu(cls, value: bool, info) -> bool:
        if value and info.data.get("serving") != "gpu":
            raise ValueError("needs export.serving=gpu (onnxruntime-gpu holds TensorRT)")
        return value


class SpeedCfg(Section):
    """How training uses a GPU: each setting changes speed and memory (and the last bits of the
    weights), never the method."""

    cudnn_benchmark: bool = False  # time cuDNN's convolution algorithms per input shape; never when deterministic
    tf32: bool = False  # TensorFloat-32 matmuls too (cuDNN convolutions use it by default; Ampere+)
    channels_last: bool = False  # NHWC memory layout for the trained models and their batches
    amp_dtype: Literal["fp16", "bf16"] = "fp16"  # the autocast type of classify.amp / segment.amp
    compile: bool = False  # torch.compile the module a training step calls


class PipelineCfg(Section):
    """`mcis pipeline`: what runs beside the method itself."""

    baselines: bool = True  # also the plain-CAM baseline and the fully supervised ceiling
    methods: list[str] = Field(default_factory=list)  # a comparison of these methods (empty: MCIS alone)
    compare_to: str | None = None  # experiment of the setting-1 pipeline that settings 2/3 report against
    ablation_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)


class TrackingCfg(Section):
    uri: str | None = None  # MLFLOW_TRACKING_URI wins; else sqlite:///mlflow.db
    experiment: str | None = None  # default: the config name
    flush_every: int = Field(50, ge=1)  # metric buffer size before a log_batch
    system_metrics: float = Field(10.0, ge=0)  # seconds between system-metric samples; 0: none


class Config(Section):
    name: str = "voc12_vgg16"
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "runs"
    data: DataCfg = Field(default_factory=DataCfg)
    classify: ClassifyCfg = Field(default_factory=ClassifyCfg)
    localize: LocalizeCfg = Field(default_factory=LocalizeCfg)
    accumulate: AccumulateCfg = Field(default_factory=AccumulateCfg)
    integral: IntegralCfg = Field(default_factory=IntegralCfg)
    pseudolabel: PseudolabelCfg = Field(default_factory=PseudolabelCfg)
    psa: PsaCfg = Field(default_factory=PsaCfg)
    affinity: AffinityCfg = Field(default_factory=AffinityCfg)
    refine: RefineCfg = Field(default_factory=RefineCfg)
    segment: SegmentCfg = Field(default_factory=SegmentCfg)
    evaluate: EvaluateCfg = Field(default_factory=EvaluateCfg)
    quality: QualityCfg = Field(default_factory=QualityCfg)
    export: ExportCfg = Field(default_factory=ExportCfg)
    speed: SpeedCfg = Field(default_factory=SpeedCfg)
    pipeline: PipelineCfg = Field(default_factory=PipelineCfg)
    tracking: TrackingCfg = Field(default_factory=TrackingCfg)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, the form MLflow params take."""
        return flatten(self.model_dump(mode="json"))

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A validated copy with some fields of some sections replaced, e.g.
        `cfg.replace(classify={"method": "cam"})`: how the pipeline derives its variants."""
        tree = self.model_dump()
        for section, fields in sections.items():
            tree[section].update(fields)
        return Config.model_validate(tree)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        hint = ("the default is relative to the current folder: run from the mcis checkout or pass "
                "--config PATH") if path == DEFAULT_CONFIG else "pass --config with an existing YAML file"
        raise McisError(f"config file not found: {path} ({hint})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise McisError(f"YAML syntax error in {path}{where}: {problem}") from None
    if not isinstance(tree, dict):
        raise McisError(f"config {path} must be a mapping of sections, got {type(tree).__name__}")
    return tree


def _set_dotted(tree: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise McisError(f"--set expects key=value, got {assignment!r}")
    parts = key.strip().split(".")
    model: type[BaseModel] = Config
    node = tree
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        if field is None:
            raise McisError(f"unknown config key in --set: {key!r}")
        if not isinstance(node.get(part), dict):  # absent, or an optional section left null
            node[part] = {}
        node = node[part]
        sections = [a for a in (field.annotation, *get_args(field.annotation))  # X | None too
                    if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sections:
            raise McisError(f"unknown config key in --set: {key!r}")
        model = sections[0]
    if parts[-1] not in model.model_fields:
        raise McisError(f"unknown config key in --set: {key!r}")
    node[parts[-1]] = yaml.safe_load(raw)


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown config key {key!r} in {source}"
    return f"invalid value for {key!r} in {source}: {first['msg']} (got {first.get('input')!r})"


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (nested mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def unset_keys(tree: dict[str, Any]) -> list[str]:
    """The config keys a tree leaves to the built-in defaults (a section set as a whole counts)."""
    given = flatten(tree)
    return [key for key in Config().flat()
            if not any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in given)]


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file with its `base:` chain resolved: `base: other.yaml` (relative to the file)
    supplies every key the file does not set, so a variant config lists only what differs.

    A file without `base:` must set every key (as voc12_vgg16.yaml does): a partial one would
    silently take the rest from the built-in defaults, the full-size VOC recipe.
    """
    if path.resolve() in seen:
        raise McisError(f"config {path} includes itself through `base:`")
    tree = _read_yaml(path)
    base = tree.pop("base", None)
    if base is None:
        unset = unset_keys(tree)
        if unset:
            raise McisError(
                f"config {path} has no `base:` and leaves {len(unset)} keys unset ({', '.join(unset[:3])}, "
                "...); start it with `base: toy.yaml` (the embedded recipe) or `base: voc12_vgg16.yaml` "
                "(the official one), given relative to the file"
            )
        return tree
    if not isinstance(base, str):
        raise McisError(f"`base:` in {path} must be a file name, got {base!r}")
    return _merge(_read_tree(path.parent / base, (*seen, path.resolve())), tree)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (and its `base:` chain), apply `key=value` overrides and validate every type."""
    path = Path(path) if path else DEFAULT_CONFIG
    tree = _read_tree(path)
    try:
        Config.model_validate(tree)
    except ValidationError as exc:
        raise McisError(_describe(exc, str(path))) from None
    for assignment in overrides or []:
        _set_dotted(tree, assignment)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise McisError(_describe(exc, "--set")) from None


def load_logged(path: str | Path) -> Config:
    """A run's logged config.yaml: complete when written, so it needs no `base:`; a key added to
    the config since then takes its default."""
    try:
        return Config.model_validate(_read_yaml(Path(path)))
    except ValidationError as exc:
        raise McisError(_describe(exc, str(path))) from None
