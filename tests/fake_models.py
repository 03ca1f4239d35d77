"""Stand-ins for ComfyUI's model objects in the unit tests (no ComfyUI needed): a BaseModel with
epsilon noise scaling and SD1.5's latent scale, and module trees with the block layout of ComfyUI's
SD1.5 and SDXL UNets (one ``SpatialTransformer`` of the given depth per block, or none), which block
discovery walks."""
import torch


class EpsSampling:
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image + noise * sigma.reshape(-1, 1, 1, 1)


class FakeBaseModel:
    model_sampling = EpsSampling()

    def process_latent_in(self, latent):
        return latent * 0.18215


class SpatialTransformer(torch.nn.Module):     # same class name as ComfyUI's, which discovery looks for
    def __init__(self, depth):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(depth))


class FakeUNet(torch.nn.Module):
    def __init__(self, inputs, middle, outputs):
        super().__init__()
        mk = lambda d: torch.nn.ModuleList([torch.nn.Identity()] + ([SpatialTransformer(d)] if d else []))
        self.input_blocks = torch.nn.ModuleList(mk(d) for d in inputs)
        self.middle_block = mk(middle)
        self.output_blocks = torch.nn.ModuleList(mk(d) for d in outputs)


SD15 = FakeUNet([0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0], 1, [0, 0, 0] + [1] * 9)
SDXL = FakeUNet([0, 0, 0, 0, 2, 2, 0, 10, 10], 10, [10, 10, 10, 2, 2, 2, 0, 0, 0])
