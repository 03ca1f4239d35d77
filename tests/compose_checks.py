"""Subject Composer checks shared by the composer and Seg-Mix tests: a random subject (an ellipse mask
in a random box) and the geometry every composition must satisfy."""
import pytest
import torch

from personalize_pack.references.compose import make_subject, mask_bbox, max_scale


def random_subject(g, name, size=(120, 90)):
    h, w = size
    img = torch.rand(h, w, 3, generator=g)
    m = torch.zeros(h, w)
    y0, x0 = int(torch.randint(0, h // 3, (), generator=g)), int(torch.randint(0, w // 3, (), generator=g))
    y1, x1 = h - int(torch.randint(0, h // 3, (), generator=g)), w - int(torch.randint(0, w // 3, (), generator=g))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, y1 - y0), torch.linspace(-1, 1, x1 - x0), indexing="ij")
    m[y0:y1, x0:x1] = ((yy ** 2 + xx ** 2) <= 1).float()        # an ellipse inside a random box
    return make_subject(img, m, name)


def subject_pixels(subject, box):
    """The subject's crop resized to its box, as the composer does (hard mask at 0.5)."""
    from personalize_pack.references.masks import resize_plane
    x0, y0, x1, y1 = mask_bbox(subject.mask)
    bw, bh = box[2] - box[0], box[3] - box[1]
    img = resize_plane(subject.image[y0:y1, x0:x1].movedim(-1, 0), bh, bw).movedim(0, -1).clamp(0, 1)
    msk = resize_plane(subject.mask[y0:y1, x0:x1], bh, bw) > 0.5
    return img, msk


def check_geometry(comp, subjects, W, H, smin, smax, margin, background="white"):
    n = len(subjects)
    assert comp.image.shape == (1, H, W, 3) and comp.masks.shape == (n, H, W)
    assert sorted(comp.order) == list(range(n))
    bg = 1.0 if background == "white" else 0.0
    covered = torch.zeros(H, W, dtype=torch.bool)
    for i, s in enumerate(subjects):
        x0, y0, x1, y1 = comp.boxes[i]
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H                       # inside the canvas
        bx0, by0, bx1, by1 = mask_bbox(s.mask)
        fmax = max_scale(bx1 - bx0, by1 - by0, W, H, n, margin)
        assert comp.max_scales[i] == pytest.approx(fmax)
        assert smin * fmax - 1e-9 <= comp.scales[i] <= smax * fmax + 1e-9      # scale in range
        assert abs((x1 - x0) - (bx1 - bx0) * comp.scales[i]) <= 1.0
        assert abs((y1 - y0) - (by1 - by0) * comp.scales[i]) <= 1.0
        assert x1 - x0 <= W / n - margin and y1 - y0 <= H - margin
        m = comp.masks[i].bool()
        assert set(comp.masks[i].unique().tolist()) <= {0.0, 1.0}
        # visible mask lies in the box and matches the pasted pixels
        outside = m.clone()
        outside[y0:y1, x0:x1] = False
        assert not outside.any()
        img, msk = subject_pixels(s, comp.boxes[i])
        local = m[y0:y1, x0:x1]
        assert not (local & ~msk).any()
        assert torch.equal(comp.image[0, y0:y1, x0:x1][local], img[local])
        # hidden parts of the subject are under a subject pasted later
        hidden = msk & ~local
        later = comp.order[comp.order.index(i) + 1:]
        if hidden.any():
            assert later and (comp.masks[list(later)].sum(0)[y0:y1, x0:x1].bool() | ~hidden).all()
        assert not (covered & m).any()                                          # masks are disjoint
        covered |= m
    assert (comp.image[0][~covered] == bg).all()                                # background elsewhere
