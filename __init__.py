"""Personalize: personalized text-to-image techniques as ComfyUI model patches.

ComfyUI loads this file and calls ``comfy_entrypoint`` (V3 node API). Nothing heavy is imported
here; the node modules import ComfyUI's API only when ComfyUI asks for the nodes.

``WEB_DIRECTORY`` serves ``web/``: ComfyUI's node help panel reads ``web/docs/<node id>.md`` from it.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import PersonalizeExtension

    return PersonalizeExtension()
