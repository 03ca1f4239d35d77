"""ComfyUI node declarations of the pack, one file per family."""
from comfy_api.latest import ComfyExtension, io

from . import (attention, detect_compare, face, infusion, masks, mip, mudi, native_refs, overfitting, reference_cache,
               references, scores, training)


class PersonalizeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*references.NODES, *attention.NODES, *masks.NODES, *face.NODES, *mip.NODES, *mudi.NODES, *scores.NODES,
                *detect_compare.NODES, *infusion.NODES, *training.NODES,
                *overfitting.NODES, *native_refs.NODES, *reference_cache.NODES]
