"""AsymmetricMASt3R (ViT encoder, two cross-attending ViT decoders, two ``catmlp+dpt`` heads) as used by MASt3R-SLAM.

Written from spec ``mast3r_network.md`` §1–3; the state dict (keys, shapes, order, the aliased
``scratch.layer_rn.*`` entries) is identical to the official checkpoint
``MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth`` so ``load_state_dict(strict=True)`` of that file works.

Frames: ``decode(feat1, pos1, feat2, pos2, ...)`` returns ``res1 = X_11`` (view-1 points in camera 1) and
``res2 = X_21`` (view-2 points in camera 1). The first decoder input defines the frame.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .blocks import DecoderBlock, EncoderBlock, PatchEmbed, layer_norm
from .heads import CatMlpDptHead, HeadOutput, PostprocessModes, cast_head_
from .precision import check_head_precision, check_precision, head_dtype, precision_context
from .rope import RoPE2D

INF = math.inf

#: The effective constructor string of the official checkpoint after upstream's rewrite (spec §1.1).
OFFICIAL_MODEL_STRING = (
    "AsymmetricMASt3R(pos_embed='RoPE100', patch_embed_cls='PatchEmbedDust3R', img_size=(512, 512), "
    "head_type='catmlp+dpt', output_mode='pts3d+desc24', depth_mode=('exp', -inf, inf), "
    "conf_mode=('exp', 1, inf), enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, "
    "dec_embed_dim=768, dec_depth=12, dec_num_heads=12, two_confs=True, desc_conf_mode=('exp', 0, inf), "
    "landscape_only=False)"
)


@dataclass(frozen=True)
class Mast3rConfig:
    """Architecture hyper-parameters (defaults = the official ViT-L / ViT-B ``catmlp+dpt`` metric checkpoint)."""

    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 768
    dec_depth: int = 12
    dec_num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    img_size: tuple = (512, 512)
    rope_base: float = 100.0
    local_feat_dim: int = 24
    two_confs: bool = True
    depth_mode: tuple = ("exp", -INF, INF)
    conf_mode: tuple = ("exp", 1.0, INF)
    desc_conf_mode: tuple = ("exp", 0.0, INF)
    desc_mode: str = "norm"

    @classmethod
    def full(cls) -> "Mast3rConfig":
        """The official checkpoint's configuration (688,638,856 parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> "Mast3rConfig":
        """The tiny test configuration of ``fixtures/mast3r_tiny_96x64`` (enc 2x128/4 heads, dec 10x96/4 heads)."""
        return cls(enc_embed_dim=128, enc_depth=2, enc_num_heads=4, dec_embed_dim=96, dec_depth=10, dec_num_heads=4)

    @classmethod
    def from_constructor_kwargs(cls, kwargs: Mapping[str, Any], strict: bool = True) -> "Mast3rConfig":
        """Map upstream ``AsymmetricMASt3R(**kwargs)`` arguments to a config.

        Args:
            kwargs: constructor keyword arguments (from the checkpoint's model string or a HF ``config.json``).
            strict: if False, unknown argument names are ignored with a warning (the strict state-dict load still
                catches any real architecture difference).

        Raises:
            ValueError: for an argument value this implementation does not support (another head, output mode,
                position embedding, ...), naming the argument; with ``strict`` unknown argument names also raise.
        """
        kw = dict(kwargs)
        out: dict[str, Any] = {}
        for name in ("enc_embed_dim", "enc_depth", "enc_num_heads", "dec_embed_dim", "dec_depth", "dec_num_heads",
                     "patch_size"):
            if name in kw:
                out[name] = int(kw.pop(name))
        if "mlp_ratio" in kw:
            out["mlp_ratio"] = float(kw.pop("mlp_ratio"))
        if "img_size" in kw:
            v = kw.pop("img_size")
            out["img_size"] = tuple(int(x) for x in (v if isinstance(v, (tuple, list)) else (v, v)))
        pos_embed = kw.pop("pos_embed", "RoPE100")
        m = re.fullmatch(r"RoPE(\d+(?:\.\d+)?)", str(pos_embed))
        if not m:
            raise ValueError(f"unsupported pos_embed {pos_embed!r}: only 2-D RoPE ('RoPE<base>') is implemented")
        out["rope_base"] = float(m.group(1))
        head_type = kw.pop("head_type", "catmlp+dpt")
        if head_type != "catmlp+dpt":
            raise ValueError(f"unsupported head_type {head_type!r}: only 'catmlp+dpt' is implemented")
        output_mode = str(kw.pop("output_mode", "pts3d+desc24"))
        m = re.fullmatch(r"pts3d\+desc(\d+)", output_mode)
        if not m:
            raise ValueError(f"unsupported output_mode {output_mode!r}: expected 'pts3d+desc<N>'")
        out["local_feat_dim"] = int(m.group(1))
        pe = kw.pop("patch_embed_cls", "PatchEmbedDust3R")
        if pe not in ("PatchEmbedDust3R", "ManyAR_PatchEmbed"):
            raise ValueError(f"unsupported patch_embed_cls {pe!r}")
        for name in ("depth_mode", "conf_mode", "desc_conf_mode"):
            if name in kw:
                v = kw.pop(name)
                if v is None or len(v) != 3:
                    raise ValueError(f"{name} must be a (name, vmin, vmax) tuple, got {v!r}")
                out[name] = (str(v[0]), float(v[1]), float(v[2]))
        if "desc_conf_mode" not in out:  # upstream falls back to conf_mode (spec §1.1)
            out["desc_conf_mode"] = out.get("conf_mode", cls.conf_mode)
        if "two_confs" in kw:
            out["two_confs"] = bool(kw.pop("two_confs"))
        if "desc_mode" in kw:
            out["desc_mode"] = str(kw.pop("desc_mode"))
        if not kw.pop("norm_im2_in_dec", True):
            raise ValueError("norm_im2_in_dec=False is not supported")
        # arguments without effect at inference
        for name in ("landscape_only", "freeze", "mask_ratio", "dec_depth2", "has_conf"):
            kw.pop(name, None)
        if kw and strict:
            raise ValueError(f"unsupported AsymmetricMASt3R argument(s): {', '.join(sorted(kw))}")
        if kw:
            warnings.warn(f"ignoring AsymmetricMASt3R argument(s) without effect here: {', '.join(sorted(kw))}",
                          stacklevel=2)
        return cls(**out)

    def validate(self) -> None:
        """Raise ValueError if the widths/heads are inconsistent."""
        for d, h, what in ((self.enc_embed_dim, self.enc_num_heads, "encoder"),
                           (self.dec_embed_dim, self.dec_num_heads, "decoder")):
            if d % h or (d // h) % 4:
                raise ValueError(f"{what} width {d} / {h} heads must give a head dimension that is a multiple of 4")
        if self.dec_depth < 4:
            raise ValueError(f"dec_depth must be >= 4 for the DPT hooks, got {self.dec_depth}")
        if self.depth_mode[0] not in ("exp", "linear", "square") or self.conf_mode[0] not in ("exp", "sigmoid") \
                or self.desc_conf_mode[0] not in ("exp", "sigmoid") or self.desc_mode != "norm":
            raise ValueError(f"unsupported output modes in {self}")


def _shape_hw(true_shape: Tensor | Sequence[int], batch: int | None = None) -> tuple[int, int]:
    """``true_shape [B,2]`` (all rows equal) or ``(H, W)`` -> ``(H, W)``; raises ValueError on mixed shapes."""
    if isinstance(true_shape, Tensor):
        rows = true_shape.reshape(-1, 2).tolist()
        if not rows:
            raise ValueError("true_shape is empty")
        if any(r != rows[0] for r in rows):
            raise ValueError(f"all images of one batch must share one shape, got {rows}")
        h, w = rows[0]
    else:
        if len(true_shape) != 2:
            raise ValueError(f"true_shape must be [B, 2] or (H, W), got {true_shape!r}")
        h, w = true_shape
    return int(h), int(w)


class Mast3rModel(nn.Module):
    """AsymmetricMASt3R with the Predictor API (``encode``/``decode``) of ``docs/interfaces.md``.

    Build with :meth:`from_config` (any size) or :func:`mast3r_slam_ros.network.loader.load_model` (checkpoint).

    Attributes:
        config: the :class:`Mast3rConfig`.
        precision: ``"fp32" | "tf32" | "bf16" | "fp16"`` used by encode/decode (heads: see ``head_precision``).
        head_precision: ``"fp32" | "bf16" | "fp16"``: dtype of the heads' DPT convolutions and local-feature MLP
            (:meth:`set_head_precision`; the final output conv and the post-processing are always float32).
    """

    #: ``decode`` accepts ``need_res2`` / ``need_desc`` (used by ``network.inference.mono``)
    supports_partial_decode = True
    #: ``decode`` handles B > 1 (used by ``network.inference.symmetric_batch``)
    supports_batched_decode = True

    def __init__(self, config: Mast3rConfig | None = None, precision: str = "fp32") -> None:
        super().__init__()
        cfg = config or Mast3rConfig()
        cfg.validate()
        self.config = cfg
        self.precision = check_precision(precision)
        self.head_precision = "fp32"
        self._fp32_heads: dict[str, Tensor] | None = None  # CPU float32 copy of the cast head weights
        self.rope = RoPE2D(cfg.rope_base)
        ed, dd = cfg.enc_embed_dim, cfg.dec_embed_dim
        # registration order = official state-dict order
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.patch_embed = PatchEmbed(cfg.patch_size, 3, ed)
        self.enc_blocks = nn.ModuleList(
            [EncoderBlock(ed, cfg.enc_num_heads, cfg.mlp_ratio, self.rope) for _ in range(cfg.enc_depth)]
        )
        self.enc_norm = layer_norm(ed)
        self.decoder_embed = nn.Linear(ed, dd, bias=True)
        self.dec_blocks = nn.ModuleList(
            [DecoderBlock(dd, cfg.dec_num_heads, cfg.mlp_ratio, self.rope) for _ in range(cfg.dec_depth)]
        )
        self.dec_norm = layer_norm(dd)
        self.dec_blocks2 = nn.ModuleList(
            [DecoderBlock(dd, cfg.dec_num_heads, cfg.mlp_ratio, self.rope) for _ in range(cfg.dec_depth)]
        )
        modes = PostprocessModes(cfg.depth_mode, cfg.conf_mode, cfg.desc_conf_mode, cfg.desc_mode)
        self.downstream_head1 = CatMlpDptHead(ed, dd, cfg.dec_depth, cfg.local_feat_dim, cfg.two_confs, modes,
                                              cfg.patch_size)
        self.downstream_head2 = CatMlpDptHead(ed, dd, cfg.dec_depth, cfg.local_feat_dim, cfg.two_confs, modes,
                                              cfg.patch_size)
        self.init_weights()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Mast3rConfig | Mapping[str, Any] | str | None = None, *,
                    precision: str = "fp32", device: str | torch.device = "cpu", **overrides: Any) -> "Mast3rModel":
        """Build a randomly initialised model of any size.

        Args:
            config: a :class:`Mast3rConfig`, ``"full"``/``"tiny"``, a dict of config fields, or None (full).
            precision: ``"fp32" | "tf32" | "bf16" | "fp16"``.
            device: target device.
            **overrides: config fields to replace (e.g. ``dec_depth=4``).

        Raises:
            ValueError: unknown preset name or inconsistent sizes.
        """
        if config is None or config == "full":
            cfg = Mast3rConfig.full()
        elif config == "tiny":
            cfg = Mast3rConfig.tiny()
        elif isinstance(config, Mast3rConfig):
            cfg = config
        elif isinstance(config, Mapping):
            cfg = Mast3rConfig(**config)
        else:
            raise ValueError(f"config must be a Mast3rConfig, 'full', 'tiny' or a dict, got {config!r}")
        if overrides:
            cfg = replace(cfg, **overrides)
        return cls(cfg, precision=precision).to(device)

    def init_weights(self) -> None:
        """CroCo-style init: xavier-uniform Linear weights, zero biases, LayerNorm 1/0, small mask token."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def config_dict(self) -> dict:
        """The config as a plain dict."""
        return asdict(self.config)

    def set_precision(self, precision: str) -> None:
        """Switch the precision of encode/decode (``"fp32" | "tf32" | "bf16" | "fp16"``)."""
        self.precision = check_precision(precision)

    def set_head_precision(self, head_precision: str) -> None:
        """Run both heads' DPT convolutions and local-feature MLPs in ``"fp32" | "bf16" | "fp16"``.

        The weights are stored once in that dtype (in place, memory format kept; :func:`heads.cast_head_`); a CPU
        float32 copy is kept so that switching back to ``fp32`` (or between bf16 and fp16) restores / re-casts
        from the exact float32 values. The final 1x1 output convs and the post-processing stay float32.
        Call it after loading the weights (``load_state_dict`` refuses reduced-precision heads).

        Raises:
            ValueError / TypeError: unknown head precision.
        """
        p = check_head_precision(head_precision)
        if p == self.head_precision:
            return
        heads = (self.downstream_head1, self.downstream_head2)
        if self._fp32_heads is None:
            self._fp32_heads = {f"{i}.{k}": v.detach().to("cpu", copy=True)
                                for i, h in enumerate(heads) for k, v in h.named_parameters()
                                if v.dtype == torch.float32}
        for i, h in enumerate(heads):  # restore float32 first, so bf16 <-> fp16 never rounds twice
            for k, v in h.named_parameters():
                ref = self._fp32_heads.get(f"{i}.{k}")
                if ref is not None and v.dtype != torch.float32:
                    v.data = ref.to(v.device)
        if p == "fp32":
            self._fp32_heads = None
        else:
            for h in heads:
                cast_head_(h, head_dtype(p))
        self.head_precision = p

    def compile_stages(self, **compile_kwargs: Any) -> "Mast3rModel":
        """Opt-in ``torch.compile`` of the encoder, the decoder and both heads (same numbers, fewer kernels).

        ``compile_kwargs`` go to :func:`torch.compile` (e.g. ``mode="max-autotune-no-cudagraphs"``). The first call
        per image size compiles (tens of seconds for the full model). Returns ``self``.
        """
        self.__dict__["encode_tokens"] = torch.compile(self.encode_tokens, **compile_kwargs)
        self.__dict__["decoder_tokens"] = torch.compile(self.decoder_tokens, **compile_kwargs)
        for head in (self.downstream_head1, self.downstream_head2):
            head.__dict__["forward"] = torch.compile(head.forward, **compile_kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.mask_token.device

    # ------------------------------------------------------------------ state dict (aliases)
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also accepts a dict holding only one name of each aliased DPT conv.

        ``downstream_head*.dpt.scratch.layer{i}_rn.weight`` and ``...scratch.layer_rn.{i-1}.weight`` are the same
        tensor; a missing one of the pair is filled from the other. Raises ValueError if both are present and differ,
        and RuntimeError while the heads are in reduced precision (``set_head_precision("fp32")`` first).
        """
        if self.head_precision != "fp32":
            raise RuntimeError(f"heads are stored in {self.head_precision}; call set_head_precision('fp32') before "
                               "load_state_dict")
        sd = dict(state_dict)
        pat = re.compile(r"^(.*\.dpt\.scratch\.)layer([1-4])_rn\.weight$")
        for key in list(sd):
            m = pat.match(key)
            if not m:
                continue
            alias = f"{m.group(1)}layer_rn.{int(m.group(2)) - 1}.weight"
            if alias not in sd:
                sd[alias] = sd[key]
            elif sd[alias] is not sd[key] and not torch.equal(sd[alias], sd[key]):
                raise ValueError(f"aliased weights {key} and {alias} differ in the state dict")
        apat = re.compile(r"^(.*\.dpt\.scratch\.)layer_rn\.([0-3])\.weight$")
        for key in list(sd):
            m = apat.match(key)
            if m:
                canon = f"{m.group(1)}layer{int(m.group(2)) + 1}_rn.weight"
                sd.setdefault(canon, sd[key])
        return super().load_state_dict(sd, strict=strict, assign=assign)

    # ------------------------------------------------------------------ encoder
    def encode_tokens(self, img: Tensor, return_block0: bool = False) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """Encoder without precision handling: ``img [B,3,H,W] -> (feat [B,P,Ce], pos [B,P,2] i64)``.

        With ``return_block0`` also returns the tokens after encoder block 0 (for stage-wise parity tests).
        """
        x, pos = self.patch_embed(img)
        tab = self.rope.tables(pos, self.config.enc_embed_dim // self.config.enc_num_heads)
        block0 = None
        for i, blk in enumerate(self.enc_blocks):
            x = blk(x, tab)
            if i == 0:
                block0 = x
        feat = self.enc_norm(x)
        return (feat, pos, block0) if return_block0 else (feat, pos)

    def encode(self, img: Tensor, true_shape: Tensor | Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Encode images (spec §3.1–3.3).

        Args:
            img: ``[B, 3, H, W]`` float32 in [-1, 1] (``(u8/255 - 0.5)/0.5``), H and W multiples of 16.
            true_shape: ``[B, 2]`` int (H, W) per image; accepted for API compatibility (the encoder does not use it).

        Returns:
            ``feat [B, P, Ce]`` float32 (``P = HW/256``, ``enc_norm``'ed) and ``pos [B, P, 2]`` int64 (row, col).

        Raises:
            ValueError: wrong image rank/channels or size not a multiple of 16.
        """
        if not isinstance(img, Tensor) or img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"img must be a [B, 3, H, W] tensor, got {getattr(img, 'shape', type(img))}")
        with torch.no_grad(), precision_context(self.precision, img.device.type, "trunk"):
            feat, pos = self.encode_tokens(img.to(self.device, torch.float32))
        return feat.float(), pos

    # ------------------------------------------------------------------ decoder
    def decoder_tokens(self, feat1: Tensor, pos1: Tensor, feat2: Tensor, pos2: Tensor, side_stream: Any = None
                       ) -> tuple[list[Tensor], list[Tensor]]:
        """Both decoder branches without precision handling (spec §3.4).

        Args:
            feat1, pos1, feat2, pos2: as in :meth:`decode`.
            side_stream: optional ``torch.cuda.Stream`` (CUDA inputs only): branch 2 runs on it, branch 1 on the
                current stream. Within a layer the branches are independent (each block reads the *previous* output
                of the other branch), so the streams only join once per layer (``wait_stream`` both ways). Same
                kernels in the same per-branch order, hence the same values as the sequential path. Meant for CUDA
                graph capture (``GraphedPredictor(decoder_streams=True)``): every tensor read across streams is
                alive until the final join.

        Returns:
            ``dec1, dec2``: lists of ``dec_depth + 1`` tensors; entry 0 is the encoder output ``[B, P, Ce]``,
            entries 1..L the block outputs ``[B, P, Cd]`` with ``dec_norm`` applied to entry L.
        """
        if feat1.shape[0] != feat2.shape[0]:
            raise ValueError(f"batch sizes differ: {feat1.shape[0]} vs {feat2.shape[0]}")
        hd = self.config.dec_embed_dim // self.config.dec_num_heads
        t1 = self.rope.tables(pos1, hd)
        t2 = self.rope.tables(pos2, hd)
        if side_stream is not None:
            return self._decoder_tokens_two_streams(feat1, feat2, t1, t2, side_stream)
        f1 = self.decoder_embed(feat1)
        f2 = self.decoder_embed(feat2)
        dec1, dec2 = [feat1], [feat2]
        for blk1, blk2 in zip(self.dec_blocks, self.dec_blocks2):
            g1 = blk1(f1, f2, t1, t2)
            g2 = blk2(f2, f1, t2, t1)
            f1, f2 = g1, g2
            dec1.append(f1)
            dec2.append(f2)
        dec1[-1] = self.dec_norm(dec1[-1])
        dec2[-1] = self.dec_norm(dec2[-1])
        return dec1, dec2

    def _decoder_tokens_two_streams(self, feat1: Tensor, feat2: Tensor, t1: Any, t2: Any, side: Any
                                    ) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`decoder_tokens` with branch 2 on ``side`` (see there); ``t1``/``t2`` are the RoPE tables."""
        if feat1.device.type != "cuda":
            raise ValueError("side_stream needs CUDA inputs")
        main = torch.cuda.current_stream(feat1.device)
        side.wait_stream(main)  # feat2, tables
        f1 = self.decoder_embed(feat1)
        with torch.cuda.stream(side):
            f2 = self.decoder_embed(feat2)
        dec1, dec2 = [feat1], [feat2]
        for blk1, blk2 in zip(self.dec_blocks, self.dec_blocks2):
            main.wait_stream(side)  # f2 of the previous layer
            side.wait_stream(main)  # f1 of the previous layer
            g1 = blk1(f1, f2, t1, t2)
            with torch.cuda.stream(side):
                g2 = blk2(f2, f1, t2, t1)
            f1, f2 = g1, g2
            dec1.append(f1)
            dec2.append(f2)
        main.wait_stream(side)
        dec1[-1] = self.dec_norm(dec1[-1])
        dec2[-1] = self.dec_norm(dec2[-1])
        return dec1, dec2

    def decode(self, feat1: Tensor, pos1: Tensor, feat2: Tensor, pos2: Tensor,
               true_shape: Tensor | Sequence[int], *, need_res2: bool = True,
               need_desc: bool | tuple[bool, bool] = True) -> tuple[HeadOutput, HeadOutput | None]:
        """Decode a pair of encoded views and run both heads (spec §3.4–3.5).

        Args:
            feat1, feat2: ``[B, P, Ce]`` encoder outputs of view 1 and view 2.
            pos1, pos2: ``[B, P, 2]`` int64 token positions.
            true_shape: ``[B, 2]`` int (H, W) (all rows equal) or a ``(H, W)`` tuple: the image size of both views.
            need_res2: if False, head 2 is skipped and ``res2`` is None (mono inference only needs ``res1``).
            need_desc: False (or a per-view pair) skips the local-feature MLP; ``desc``/``desc_conf`` are then None.

        Returns:
            ``(res1, res2)``: :class:`HeadOutput` of view 1 in camera 1 (``X_11``) and view 2 in camera 1
            (``X_21``), each with ``pts3d [B,H,W,3]``, ``conf [B,H,W]``, ``desc [B,H,W,F]``, ``desc_conf [B,H,W]``
            float32.

        Raises:
            ValueError: on mismatched shapes or mixed image sizes within the batch.
        """
        for name, f, p in (("1", feat1, pos1), ("2", feat2, pos2)):
            if f.ndim != 3 or p.ndim != 3 or p.shape[-1] != 2 or f.shape[:2] != p.shape[:2]:
                raise ValueError(f"feat{name} must be [B,P,C] and pos{name} [B,P,2], got {tuple(f.shape)}, "
                                 f"{tuple(p.shape)}")
        hw = _shape_hw(true_shape)
        nd1, nd2 = (need_desc, need_desc) if isinstance(need_desc, bool) else need_desc
        dev = feat1.device.type
        with torch.no_grad():
            with precision_context(self.precision, dev, "trunk"):
                dec1, dec2 = self.decoder_tokens(feat1, pos1, feat2, pos2)
            with precision_context(self.precision, dev, "head"):
                res1 = self.downstream_head1([t.float() for t in dec1], hw, need_desc=nd1)
                res2 = None
                if need_res2:
                    res2 = self.downstream_head2([t.float() for t in dec2], hw, need_desc=nd2)
        return res1, res2

    def forward(self, img1: Tensor, img2: Tensor, true_shape: Tensor | Sequence[int] | None = None
                ) -> tuple[HeadOutput, HeadOutput]:
        """Full pair inference: ``encode`` both images, then :meth:`decode` (``img*`` ``[B,3,H,W]`` in [-1, 1])."""
        f1, p1 = self.encode(img1)
        f2, p2 = self.encode(img2)
        shape = true_shape if true_shape is not None else tuple(img1.shape[-2:])
        res1, res2 = self.decode(f1, p1, f2, p2, shape)
        assert res2 is not None
        return res1, res2


AsymmetricMASt3R = Mast3rModel
