"""Residual blocks built from the fused ops: the seed's RES_CNN1D done right, gluon-cv's
BasicBlockV1 in 1-D, and a Flux-style SkipConnection around any block."""
import mxnet as mx
from mxnet.gluon import HybridBlock, nn

from .basic import AddReLU, ConvBN1D, ConvBNReLU1D, _FusedBlock, _single


def _same_padding(kernel_size, dilation):
    span = dilation * (kernel_size - 1)
    if span % 2:
        raise ValueError(
            f"kernel_size={kernel_size} with dilation={dilation} has no 'same' padding (the "
            "dilated kernel spans an even number of steps), so the body cannot keep the "
            "input width for the residual add; use an odd kernel_size")
    return span // 2


class ResidualBlock1D(_FusedBlock):
    r"""``relu(body(x) + shortcut(x))`` with a chain of fused convs as the body.

    The body is ``chain_length`` convolutions: every one but the last is a fused
    ``ConvBNReLU1D``; the last is ``ConvBN1D`` (its relu comes after the join, fused with the
    add). The first conv carries the stride. The shortcut is the identity, or a projection
    (1x1 ``ConvBN1D`` with the same stride) where the channel count or width changes.

    Parameters
    ----------
    channels : int
    kernel_size : int
        Odd, so that 'same' padding exists: every conv pads by
        ``dilation * (kernel_size - 1) // 2``, and the body's output width is
        ``ceil(width / strides)``, which the strided projection matches.
    strides : int, default 1
    chain_length : int, default 1
    dilation : int, default 1
    projection : 'auto', True or False, default 'auto'
        'auto' adds the projection when ``strides > 1`` or ``in_channels`` differs from
        ``channels``. With ``in_channels=0`` (inferred) and ``strides == 1`` it assumes the
        identity and says so clearly at the first call if the input's channel count differs.
        False never adds one and refuses shapes that cannot be added.
    use_bias, momentum, epsilon, in_channels, use_native
        As in ``ConvBNReLU1D`` (use_native goes to every fused block inside).
    """

    def __init__(self, channels, kernel_size, strides=1, chain_length=1, dilation=1,
                 projection="auto", use_bias=True, momentum=0.9, epsilon=1e-5, in_channels=0,
                 **kwargs):
        super().__init__(**kwargs)
        channels, kernel_size = _single(channels, "channels"), _single(kernel_size, "kernel_size")
        strides, dilation = _single(strides, "strides"), _single(dilation, "dilation")
        in_channels = _single(in_channels, "in_channels")
        if _single(chain_length, "chain_length") < 1:
            raise ValueError(f"chain_length must be >= 1, got {chain_length}")
        if projection not in ("auto", True, False):
            raise ValueError(f"projection must be 'auto', True or False, got {projection!r}")
        pad = _same_padding(kernel_size, dilation)
        changes_shape = strides > 1 or (in_channels and in_channels != channels)
        if projection is False and changes_shape:
            raise ValueError(
                f"projection=False but the body changes the shape (in_channels={in_channels}, "
                f"channels={channels}, strides={strides}): the identity shortcut cannot be "
                "added; use projection='auto'")
        self._channels, self._in_channels = channels, in_channels
        self._projection = projection is True or (projection == "auto" and changes_shape)
        self._may_infer_identity = not self._projection and not in_channels
        impl = dict(use_native=self._use_native)  # the children run the implementation asked for
        common = dict(impl, dilation=dilation, padding=pad, use_bias=use_bias, momentum=momentum,
                      epsilon=epsilon)
        with self.name_scope():
            self.body = nn.HybridSequential(prefix="body_")
            with self.body.name_scope():
                for i in range(chain_length):
                    last = i == chain_length - 1
                    cls = ConvBN1D if last else ConvBNReLU1D
                    self.body.add(cls(channels, kernel_size, strides=strides if i == 0 else 1,
                                      in_channels=in_channels if i == 0 else channels,
                                      **common))
            if self._projection:
                self.shortcut = ConvBN1D(channels, 1, strides=strides, use_bias=False, **impl,
                                         momentum=momentum, epsilon=epsilon,
                                         in_channels=in_channels, prefix="shortcut_")
            else:
                self.shortcut = None
            self.join = AddReLU(prefix="join_", **impl)

    def forward(self, x, *args):
        # Inside a hybridized parent x is a Symbol: the add+relu's shape check speaks then.
        if (self._may_infer_identity and isinstance(x, mx.nd.NDArray)
                and x.shape[1] != self._channels):
            raise ValueError(
                f"input has {x.shape[1]} channels but the block outputs {self._channels}: the "
                "identity shortcut cannot be added. Pass in_channels="
                f"{x.shape[1]} (a projection shortcut is then created) or projection=True")
        return super().forward(x, *args)

    def hybrid_forward(self, F, x):
        skip = self.shortcut(x) if self.shortcut is not None else x
        return self.join(self.body(x), skip)


class BasicBlock1D(ResidualBlock1D):
    """gluon-cv's ``BasicBlockV1`` in 1-D: ``body`` (conv3-BN-relu, conv3-BN) plus an optional
    ``downsample`` (1x1 conv + BN, strided), joined by a fused add+relu.

    Parameters
    ----------
    channels : int
    stride : int
    downsample : bool, default False
        Add the projection shortcut (needed when stride > 1 or the channel count changes).
    in_channels : int, default 0
    """

    def __init__(self, channels, stride, downsample=False, in_channels=0, **kwargs):
        super().__init__(channels, 3, strides=stride, chain_length=2, use_bias=False,
                         projection=bool(downsample), in_channels=in_channels, **kwargs)

    @property
    def downsample(self):
        return self.shortcut


class SkipConnection(HybridBlock):
    """Flux-style shortcut around any block: ``connection(block(x), x)``.

    Parameters
    ----------
    block : HybridBlock
    mode : 'add' or 'concat', default 'add'
        'add' is Flux's ``IdentitySkip`` (shapes must match); 'concat' is ``CatSkip``,
        concatenating ``block(x)`` and ``x`` along the channel axis (axis 1).
    activation : 'relu' or None, default 'relu'
        Applied after the join. add+relu runs as one fused op.
    use_native : None, True or False
        For the fused add+relu, as in ``AddReLU``.
    """

    def __init__(self, block, mode="add", activation="relu", use_native=None, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("add", "concat"):
            raise ValueError(f"mode must be 'add' or 'concat', got {mode!r}")
        if activation not in ("relu", None):
            raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
        self._mode, self._activation = mode, activation
        with self.name_scope():
            self.block = block
            self.join = (AddReLU(use_native=use_native) if (mode, activation) == ("add", "relu")
                         else None)

    def hybrid_forward(self, F, x):
        y = self.block(x)
        if self.join is not None:
            return self.join(y, x)
        y = y + x if self._mode == "add" else F.concat(y, x, dim=1)
        return F.relu(y) if self._activation == "relu" else y

    def __repr__(self):
        return (f"{self.__class__.__name__}(mode={self._mode!r}, activation={self._activation!r}"
                f")\n  {self.block!r}")
