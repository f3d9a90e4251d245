"""BiSeNetV2, a real-time architecture next to smp's: ``model.arch: BiSeNetV2`` in a recipe.

Written from the paper (Yu et al. 2021, "BiSeNet V2: Bilateral Network with Guided Aggregation
for Real-time Semantic Segmentation", IJCV; section and table numbers below are the paper's):

* the **detail branch** (Table 1): wide and shallow, nine 3x3 conv-BN-ReLU in three stages,
  each starting with a stride 2: spatial detail at 1/8;
* the **semantic branch**: narrow (lambda = 4: 16 channels where the detail branch has 64) and
  deep, downsampling fast to 1/32: the **stem block** (Fig. 4a, 1/4), **gather-and-expansion
  layers** (Fig. 5b/c, expansion ratio 6) for stages 3-5 and the **context embedding block**
  (Fig. 4b, global average pooling added back to every position);
* **bilateral guided aggregation** (Fig. 6): each branch gates the other at its own
  resolution (detail at 1/8 by the upsampled semantic sigmoid, the semantic at 1/32 by the
  downsampled detail), the two sums meet at 1/8;
* the **segmentation head** (Fig. 7): 3x3 conv-BN-ReLU, 1x1 conv to the classes, bilinear x8.

The **booster** (section 4.4): extra segmentation heads on the semantic branch's stem and stages
3, 4 and 5 (1/4, 1/8, 1/16, 1/32), trained with the same label loss, weighted by the recipe's
``loss.aux_weight`` (the paper's alpha, 1 by default). They exist only in training mode: there
``forward`` returns ``(logits, [aux logits...])``, every map at the input's resolution; in eval
mode it returns only the raw per-class logits ``[N, C, H, W]``, so evaluation, the TorchScript
/ONNX export and the serving handler see a plain segmentation model. The booster's weights stay
in the checkpoint (a rebuilt model loads the same state dict) and are dropped by the export's
trace, which records the eval path only.

H and W must be multiples of :data:`OUTPUT_STRIDE` (32): the aggregation adds a 1/8 map to a
1/32 map upsampled x4, which only line up when the 1/32 map is exact. The run's metadata carries
that stride as ``preprocess.size_divisor`` (``training.model.output_stride``), and the handler
pads every batch to it.

Example:
    >>> model = BiSeNetV2(num_classes=3, width=0.25, head_channels=16, aux_channels=8)
    >>> model.eval()(torch.zeros(1, 3, 64, 96)).shape
    torch.Size([1, 3, 64, 96])
    >>> logits, aux = model.train()(torch.zeros(2, 3, 64, 64))
    >>> logits.shape, [tuple(a.shape[1:]) for a in aux]
    (torch.Size([2, 3, 64, 64]), [(3, 64, 64), (3, 64, 64), (3, 64, 64), (3, 64, 64)])
"""

from __future__ import annotations

import torch
from torch import nn

# The total downsampling of the semantic branch: input H and W must be multiples of it.
OUTPUT_STRIDE = 32

# Table 1 at width 1: detail stages S1-S3, semantic stem and stages S3-S5.
DETAIL_CHANNELS = (64, 64, 128)
SEMANTIC_CHANNELS = (16, 32, 64, 128)


def conv_bn(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv (no bias: BN has one) + BatchNorm (+ ReLU): the paper's "Conv" box.

    >>> conv_bn(8, 16, stride=2)(torch.zeros(1, 8, 32, 32)).shape
    torch.Size([1, 16, 16, 16])
    """
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to a multiple of 8, at least 8 (MobileNet's rule: vector
    units like multiples of 8, and BatchNorm on a handful of channels trains badly).

    >>> scaled(64, 1.0), scaled(64, 0.5), scaled(16, 0.25)
    (64, 32, 8)
    """
    return max(8, int(channels * width + 4) // 8 * 8)


class DetailBranch(nn.Sequential):
    """Three stages of 3x3 conv-BN-ReLU (2, 3, 3 of them), each starting with a stride 2: 1/8."""

    def __init__(self, channels: tuple[int, int, int]) -> None:
        c1, c2, c3 = channels
        super().__init__(
            conv_bn(3, c1, stride=2), conv_bn(c1, c1),
            conv_bn(c1, c2, stride=2), conv_bn(c2, c2), conv_bn(c2, c2),
            conv_bn(c2, c3, stride=2), conv_bn(c3, c3), conv_bn(c3, c3),
        )  # fmt: skip


class StemBlock(nn.Module):
    """Fig. 4a: a stride-2 conv, then a strided conv path and a max-pool path concatenated: 1/4.

    The two downsampling paths cost little and keep different features (learned vs. peak)."""

    def __init__(self, cout: int) -> None:
        super().__init__()
        self.conv = conv_bn(3, cout, stride=2)
        self.left = nn.Sequential(
            conv_bn(cout, cout // 2, kernel=1), conv_bn(cout // 2, cout, stride=2)
        )
        self.right = nn.MaxPool2d(3, stride=2, padding=1)
        self.fuse = conv_bn(2 * cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.fuse(torch.cat([self.left(x), self.right(x)], dim=1))


class GatherExpansion(nn.Module):
    """Fig. 5b (stride 1) and 5c (stride 2): gather with a 3x3 conv, expand ``expansion``-fold
    with depthwise 3x3 conv(s), project back with a 1x1 conv, add the shortcut, ReLU.

    Stride 2 uses two depthwise convs (the first strided) to widen the receptive field, and a
    depthwise + 1x1 shortcut (the identity no longer fits). Only the gather conv and the sum
    have a ReLU, as drawn in the paper (inverted-residual style: a ReLU on the narrow projection
    would destroy information).
    """

    def __init__(self, cin: int, cout: int, stride: int, expansion: int = 6) -> None:
        super().__init__()
        mid = cin * expansion
        self.gather = conv_bn(cin, cin)
        if stride == 1:
            if cin != cout:
                raise ValueError(f"a stride-1 GE layer keeps its channels, got {cin} -> {cout}")
            self.expand: nn.Module = conv_bn(cin, mid, groups=cin, relu=False)
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.expand = nn.Sequential(
                conv_bn(cin, mid, stride=stride, groups=cin, relu=False),
                conv_bn(mid, mid, groups=mid, relu=False),
            )
            self.shortcut = nn.Sequential(
                conv_bn(cin, cin, stride=stride, groups=cin, relu=False),
                conv_bn(cin, cout, kernel=1, relu=False),
            )
        self.project = conv_bn(mid, cout, kernel=1, relu=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.project(self.expand(self.gather(x))) + self.shortcut(x))


class ContextEmbedding(nn.Module):
    """Fig. 4b: global average pooling, BN, 1x1 conv-BN-ReLU, added to every position, 3x3 conv.

    The pooled vector is BatchNorm-ed over the batch alone (one value per channel and image):
    training needs at least 2 images per batch (checked by the recipe)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.embed = conv_bn(channels, channels, kernel=1)
        self.conv = conv_bn(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean over H, W rather than AdaptiveAvgPool2d: the same numbers, and an op that
        # torch.export (ONNX) handles at dynamic sizes without a special case.
        context = self.embed(self.bn(x.mean(dim=(2, 3), keepdim=True)))
        return self.conv(x + context)


class SemanticBranch(nn.Module):
    """Stem (1/4), GE stages 3 and 4 (1/8, 1/16: one strided + one plain layer each), stage 5
    (1/32: one strided + three plain) and the context embedding. Returns every stage's output,
    the booster heads' inputs, and the context last."""

    def __init__(self, channels: tuple[int, int, int, int], expansion: int = 6) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.stem = StemBlock(c1)
        self.stage3 = nn.Sequential(
            GatherExpansion(c1, c2, 2, expansion), GatherExpansion(c2, c2, 1, expansion)
        )
        self.stage4 = nn.Sequential(
            GatherExpansion(c2, c3, 2, expansion), GatherExpansion(c3, c3, 1, expansion)
        )
        self.stage5 = nn.Sequential(
            GatherExpansion(c3, c4, 2, expansion),
            *(GatherExpansion(c4, c4, 1, expansion) for _ in range(3)),
        )
        self.context = ContextEmbedding(c4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.stem(x)
        s3 = self.stage3(stem)
        s4 = self.stage4(s3)
        s5 = self.stage5(s4)
        return [stem, s3, s4, s5, self.context(s5)]


class GuidedAggregation(nn.Module):
    """Fig. 6: detail (1/8) and semantic (1/32) features, same channels, gate each other.

    Detail path 1 (1/8): depthwise 3x3 + 1x1, gated by sigmoid(3x3 conv of the semantic, x4 up).
    Detail path 2 (down to 1/32): strided 3x3 conv + strided 3x3 average pool, gated by
    sigmoid(depthwise 3x3 + 1x1 of the semantic). The second is upsampled x4, summed with the
    first, and a 3x3 conv-BN-ReLU fuses them.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.detail_keep = nn.Sequential(
            conv_bn(c, c, groups=c, relu=False), nn.Conv2d(c, c, 1, bias=False)
        )
        self.detail_down = nn.Sequential(
            conv_bn(c, c, stride=2, relu=False), nn.AvgPool2d(3, stride=2, padding=1)
        )
        # scale_factor, not size=: a trace records the factor, so the exported model stays
        # valid at every input size (a traced size= would freeze the traced one).
        self.semantic_up = nn.Sequential(conv_bn(c, c, relu=False), _upsample(4))
        self.semantic_keep = nn.Sequential(
            conv_bn(c, c, groups=c, relu=False), nn.Conv2d(c, c, 1, bias=False)
        )
        self.up = _upsample(4)
        self.fuse = conv_bn(c, c)

    def forward(self, detail: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        high = self.detail_keep(detail) * torch.sigmoid(self.semantic_up(semantic))
        low = self.detail_down(detail) * torch.sigmoid(self.semantic_keep(semantic))
        return self.fuse(high + self.up(low))


def _upsample(factor: int) -> nn.Upsample:
    return nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False)


class SegmentationHead(nn.Sequential):
    """Fig. 7: 3x3 conv-BN-ReLU to ``mid`` channels, 1x1 conv to the classes, bilinear up to
    the input's resolution (raw logits: the loss and the handler apply softmax/argmax)."""

    def __init__(self, cin: int, mid: int, num_classes: int, factor: int) -> None:
        super().__init__(conv_bn(cin, mid), nn.Conv2d(mid, num_classes, 1), _upsample(factor))


class BiSeNetV2(nn.Module):
    """BiSeNetV2 returning raw logits at the input's resolution; see the module docstring.

    ``width`` scales every channel count (rounded to multiples of 8); ``expansion`` is the GE
    layers' ratio (6 in the paper); ``head_channels`` / ``aux_channels`` the hidden channels of
    the main and booster heads (1024 / 128 in the authors' reference code; the paper leaves them
    open). Set them in a recipe as ``model.kwargs``.

    Example:
        >>> net = BiSeNetV2(num_classes=4, width=0.5, head_channels=32).eval()
        >>> net(torch.zeros(2, 3, 32, 64)).shape
        torch.Size([2, 4, 32, 64])
    """

    output_stride = OUTPUT_STRIDE

    def __init__(
        self,
        num_classes: int,
        width: float = 1.0,
        expansion: int = 6,
        head_channels: int = 1024,
        aux_channels: int = 128,
    ) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0 (a channel multiplier, e.g. 0.5), got {width}")
        sizes = {"expansion": expansion, "head_channels": head_channels,
                 "aux_channels": aux_channels, "num_classes": num_classes}  # fmt: skip
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        detail = tuple(scaled(c, width) for c in DETAIL_CHANNELS)
        semantic = tuple(scaled(c, width) for c in SEMANTIC_CHANNELS)
        self.detail = DetailBranch(detail)  # type: ignore[arg-type]
        self.semantic = SemanticBranch(semantic, expansion)  # type: ignore[arg-type]
        self.aggregation = GuidedAggregation(detail[-1])  # == semantic[-1]: both 128 * width
        self.head = SegmentationHead(detail[-1], head_channels, num_classes, factor=8)
        # The booster: one head per semantic stage (stem 1/4, stages 3-5: 1/8, 1/16, 1/32).
        self.aux_heads = nn.ModuleList(
            SegmentationHead(c, aux_channels, num_classes, factor=f)
            for c, f in zip(semantic, (4, 8, 16, 32), strict=True)
        )
        # PyTorch's default initialisation. He (fan_out) init, as in the authors' code, starts
        # the five classifiers with large logits; measured on the embedded scenes it left one
        # seed in four stuck near 0.19 val mIoU where the default reached 0.34-0.37.

    def forward(self, x: torch.Tensor):  # -> Tensor (eval) | (Tensor, list[Tensor]) (training)
        detail = self.detail(x)
        features = self.semantic(x)
        logits = self.head(self.aggregation(detail, features[-1]))
        # TorchScript compiles the eval path only (one return type); a trace is taken in eval.
        if not torch.jit.is_scripting():
            if self.training:
                aux = [head(f) for head, f in zip(self.aux_heads, features[:-1], strict=True)]
                return logits, aux
        return logits
