"""aimv2.packing: the packed native-resolution batch every native path shares."""
import pytest
import torch

from aimv2.kernels import patchify
from aimv2.packing import PackedBatch, cu_seqlens_of, pack_images, unpack, unpatchify

P = 14
SIZES = [(224, 224), (168, 448), (448, 168), (14, 14), (518, 392)]


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def test_pack_round_trip_and_layout():
    ims = _images(SIZES)
    b = pack_images(ims, P, prefix_len=[3, 1, 0, 1, 5])
    assert b.grids == ((16, 16), (12, 32), (32, 12), (1, 1), (37, 28))
    assert b.cu_seqlens.tolist() == [0, 256, 640, 1024, 1025, 2061] and b.max_seqlen == 1036
    for im, part, g in zip(ims, unpack(b.patches, b.grids), b.grids):
        torch.testing.assert_close(part, patchify(im[None], P)[0], rtol=0, atol=0)
        torch.testing.assert_close(unpatchify(part, g, P), im, rtol=0, atol=0)


def test_cu_seqlens_of():
    assert cu_seqlens_of([]).tolist() == [0]
    assert cu_seqlens_of([5, 1, 7]).dtype == torch.int32


@pytest.mark.parametrize("bad, msg", [
    (lambda: pack_images([], P), "no images"),
    (lambda: pack_images([torch.randn(3, 20, 28)], P), "not a positive multiple"),
    (lambda: pack_images([torch.randn(3, 28, 28), torch.randn(1, 28, 28)], P), "channels"),
    (lambda: pack_images([torch.zeros(3, 28, 28, dtype=torch.uint8)], P), "float"),
    (lambda: pack_images(_images([(28, 28), (14, 42)]), P, prefix_len=[4, 4]), "image 1 has prefix 4"),
    (lambda: pack_images(_images([(28, 28)]), P, prefix_len=[1, 2]), "one per image"),
    (lambda: PackedBatch(torch.randn(5, 588), torch.tensor([0, 5], dtype=torch.int32), ((2, 2),)), "hold 4"),
    (lambda: PackedBatch(torch.randn(4, 588), torch.tensor([0, 3], dtype=torch.int32), ((2, 2),)), "disagrees"),
    (lambda: PackedBatch(torch.randn(4, 588), torch.tensor([0, 4]), ((2, 2),)), "int32"),
    (lambda: PackedBatch(torch.randn(4, 588), torch.tensor([0, 4], dtype=torch.int32), ((2, 0),)), "positive"),
])
def test_bad_packs_are_clear_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        bad()
