"""Personalize: personalized text-to-image techniques as ComfyUI model patches.

ComfyUI loads this file and calls ``comfy_entrypoint`` (V3 node API). Nothing heavy is imported
here; the node modules import ComfyUI's API only when ComfyUI asks for the nodes. On that call the
example workflows' input images are copied into ComfyUI's input folder where a file of their name is
missing (``files/example_inputs.py``; an existing file is never replaced), so the templates open with
their images.

``WEB_DIRECTORY`` serves ``web/``: ComfyUI's node help panel reads ``web/docs/<node id>.md`` from it.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    import folder_paths

    from .files.example_inputs import install_example_inputs
    from .nodes import PersonalizeExtension

    install_example_inputs(folder_paths.get_input_directory())
    return PersonalizeExtension()
