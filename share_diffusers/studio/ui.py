"""Share style studio: a Gradio app to browse, blend, compare, merge and save Share styles on Flux.

    share-diffusers app [--model REPO_OR_DIR] [--factors DIR_OR_HUB_ID] [--port 7860] [--read-only]

With no ``--model`` it runs the embedded demo model (a small Flux trained on Fashion-MNIST, shipped in
the package: no download) and, with no ``--factors``, its four demo styles learned continually into one
Share checkpoint (inverted, tint, stripes, outlines). ``--model tiny-random`` runs the random-weight
tiny pipeline with three random demo LoRAs instead (fast, for tests). Every error shows in the page as one
line (``gr.Error``), never as a stack trace. Beside the style previews, a map of the bank (styles close
on it have similar weight updates) and a table of what each style keeps of its LoRA, updated after every
merge and delete; the last merge can be undone (the bank back bit for bit). API endpoints for
``gradio_client``: ``/generate``, ``/compare``, ``/merge_lora``, ``/undo_merge``, ``/delete_style``,
``/save_factors``, ``/styles``, ``/style_map``.

One pipeline serves every visitor, one call at a time, so a call is bounded by the model's limits (images,
steps, size, and their product: :meth:`~share_diffusers.runtime.GenerationDefaults.check_call`), a Stop
button ends a running generation between denoising steps, and the queue holds at most ``--max-queue``
requests. Every visitor shares one style bank too: ``--read-only`` turns merging and deleting off.
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace

import gradio as gr

from ..hub import HubError
from ..runtime import (
    DEFAULT_PROMPTS,
    DTYPES,
    TINY_RANDOM,
    USER_ERRORS,
    GenerationDefaults,
    check_server_options,
    defaults_for,
    error_line,
    load_pipeline,
    load_styles,
    parse_style,
    resolve_device,
    resolve_dtype,
    style_caption,
)
from .engine import (
    DEFAULT_MAX_MERGE_MB,
    MAX_SEED,
    READ_ONLY_MESSAGE,
    StyleStudio,
    merge_source,
    page_settings,
    pick_seed,
)
from .plots import style_map_figure
from .text import (
    blend_text,
    held_selection,
    in_page_terms,
    parse_prompts,
    parse_single_prompt,
    parse_style_lines,
    style_choices,
)

BLEND_SLOTS = 3
CSS = ".pixel-art img { image-rendering: pixelated; } #style-table td { white-space: nowrap; }"
# Gradio hands each call its own tracker configured like this default (pipeline and download bars).
TRACK_TQDM = gr.Progress(track_tqdm=True)
_REMEMBERED_ERRORS = 256  # sessions whose last merge error is kept for the report box
# Requests waiting for the one pipeline; with calls bounded to seconds, a full queue is a minute or two of work.
MAX_QUEUE = 16
# Gradio's copies of generated images, uploads and zips: every hour, those older than an hour are deleted.
DELETE_CACHE = (3600, 3600)


def user_errors(handler):
    """Show an error's message in the page as one line: the library's own without a stack trace, an
    unexpected one with its type (and its stack trace in the server's log)."""

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as error:
            raise gr.Error(error_line(error), print_exception=False) from None
        except Exception as error:
            raise gr.Error(f"{type(error).__name__}: {error_line(error)}") from error

    return wrapper


class Handlers:
    """Gradio event handlers: values from the page in, values for the page out."""

    def __init__(self, studio: StyleStudio):
        self.studio = studio
        # The last failed merge's message per browser session, for the report box once the toast fades.
        self._merge_errors: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._sessions_lock = threading.Lock()
        # The running generations' stop events per browser session, for the Stop button.
        self._stops: dict[str, set[threading.Event]] = {}

    @contextmanager
    def _stoppable(self, request: gr.Request | None) -> Iterator[threading.Event | None]:
        """A stop event for one generation of ``request``'s session (None without a session)."""
        session = getattr(request, "session_hash", None)
        if not session:
            yield None
            return
        event = threading.Event()
        with self._sessions_lock:
            self._stops.setdefault(session, set()).add(event)
        try:
            yield event
        finally:
            with self._sessions_lock:
                events = self._stops.get(session, set())
                events.discard(event)
                if not events:
                    self._stops.pop(session, None)

    def stop(self, request: gr.Request = None) -> None:
        """Stop the generations running for this session (another visitor's go on) before their next step."""
        with self._sessions_lock:
            for event in self._stops.get(getattr(request, "session_hash", None) or "", ()):
                event.set()

    @user_errors
    def generate(
        self,
        prompts,
        styles,
        style_scale,
        seed,
        randomize,
        steps,
        width,
        height,
        guidance,
        progress=TRACK_TQDM,
        request: gr.Request = None,
    ):
        prompt_list = parse_prompts(prompts)
        specs = parse_style_lines(styles, len(prompt_list))
        seed = pick_seed(seed, randomize)
        settings = page_settings(steps, width, height, guidance)
        with self._stoppable(request) as stop:
            images = self.studio.generate(prompt_list, specs, seed, style_scale=style_scale, stop=stop, **settings)
        captions = [
            f"{prompt} · {style_caption(spec, style_scale)}" for prompt, spec in zip(prompt_list, specs, strict=True)
        ]
        return list(zip(images, captions, strict=True)), seed

    @user_errors
    def compare(
        self,
        prompt,
        styles,
        style_scale,
        seed,
        randomize,
        steps,
        width,
        height,
        guidance,
        progress=TRACK_TQDM,
        request: gr.Request = None,
    ):
        prompt = parse_single_prompt(prompt)
        specs = [parse_style(text) for text in styles or []]
        seed = pick_seed(seed, randomize)
        settings = page_settings(steps, width, height, guidance)
        with self._stoppable(request) as stop:
            return self.studio.compare(prompt, specs, seed, style_scale=style_scale, stop=stop, **settings), seed

    def merge_lora(self, hub_id, weight_name, upload, style_name, request: gr.Request = None, progress=TRACK_TQDM):
        try:
            return self._merge_lora(hub_id, weight_name, upload, style_name, progress)
        except gr.Error as error:
            if request is not None and request.session_hash:
                with self._sessions_lock:
                    self._merge_errors[request.session_hash] = error.message
                    while len(self._merge_errors) > _REMEMBERED_ERRORS:
                        self._merge_errors.popitem(last=False)
            raise

    @user_errors
    def _merge_lora(self, hub_id, weight_name, upload, style_name, progress):
        source, name = merge_source(hub_id, upload, style_name, weight_name)
        progress(0, desc="merging the LoRA")
        try:
            return str(self.studio.merge(source, name, weight_name=(weight_name or "").strip() or None))
        except HubError as error:
            raise HubError(in_page_terms(error_line(error))) from None

    def merge_failed(self, request: gr.Request = None):
        """The report box after a failed merge: its one-line message (the toast fades, this stays)."""
        with self._sessions_lock:
            message = self._merge_errors.pop(getattr(request, "session_hash", None) or "", "the merge failed")
        return f"error: {message}"

    @user_errors
    def undo_merge(self):
        name = self.studio.undo_merge()
        styles = ", ".join(self.studio.styles()) or "none"
        return f"undid the merge of {name!r}: the other styles are as they were before it; styles: {styles}"

    @user_errors
    def delete_style(self, name):
        self.studio.delete(name)
        left = self.studio.styles()
        return f"deleted {name!r}; styles left: {', '.join(left) or 'none'}"

    @user_errors
    def save_factors(self):
        return str(self.studio.save_factors_zip())

    @user_errors
    def style_gallery(self, progress=TRACK_TQDM):
        return self.studio.previews()

    @user_errors
    def style_overview(self):
        """The map of the styles (a matplotlib figure, None with no styles) and the table of kept energy."""
        overview = self.studio.overview()
        figure = style_map_figure(overview.layout) if overview.similarity.names else None
        return figure, overview.markdown()

    def style_menus(self, compare_selection):
        """New choices for every style menu; the compare selection keeps its styles and typed blends still held."""
        styles = self.studio.styles()
        choices = style_choices(styles)
        kept = held_selection(compare_selection, styles)
        slots = [gr.update(choices=choices) for _ in range(BLEND_SLOTS)]
        return *slots, gr.update(choices=choices, value=kept), gr.update(choices=styles, value=None)

    @user_errors
    def blend(self, *slot_values):
        """The style line of the blend builder: ``(style, weight, per-block weights)`` per slot."""
        slots = list(zip(slot_values[0::3], slot_values[1::3], slot_values[2::3], strict=True))
        return blend_text(slots, self.studio.block_layout())


# -- layout -------------------------------------------------------------------------------------


def _settings(defaults: GenerationDefaults) -> SimpleNamespace:
    with gr.Accordion("Settings", open=True):
        style_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Style strength", info="multiplies every style")
        with gr.Row():
            seed = gr.Number(
                value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", info="every image of a call uses it"
            )
            randomize = gr.Checkbox(value=False, label="Randomize seed")
        steps = gr.Slider(1, defaults.max_steps, value=defaults.steps, step=1, label="Steps")
        size = dict(minimum=defaults.size_step, maximum=defaults.max_size, step=defaults.size_step)
        with gr.Row():
            width = gr.Slider(value=defaults.width, label="Width", **size)
            height = gr.Slider(value=defaults.height, label="Height", **size)
        guidance = gr.Slider(0, 10, value=defaults.guidance, step=0.1, label="Guidance")
    return SimpleNamespace(
        style_scale=style_scale,
        seed=seed,
        randomize=randomize,
        steps=steps,
        width=width,
        height=height,
        guidance=guidance,
    )


def _image_gallery(
    label: str, elem_id: str, defaults: GenerationDefaults, columns: int, height: int | None = None
) -> gr.Gallery:
    return gr.Gallery(
        label=label,
        elem_id=elem_id,
        elem_classes=["pixel-art"] if defaults.pixel_art else None,
        format="png",
        columns=columns,
        height=height,
        object_fit="contain",
        buttons=["download", "download_all", "fullscreen"],
        interactive=False,
    )


def _generate_tab(choices: list[str], defaults: GenerationDefaults, blocks: str) -> SimpleNamespace:
    with gr.Tab("Generate"):
        prompts = gr.Textbox(
            label="Prompts",
            elem_id="prompts",
            info="one per line: the whole batch is one pipeline call",
            lines=3,
            value="\n".join(DEFAULT_PROMPTS),
        )
        styles = gr.Textbox(
            label="Styles",
            elem_id="style-lines",
            lines=2,
            value="none",
            info="one line per prompt, or one line for all: a style, none, a blend like ink=0.5,neon=0.5, "
            "per-block weights like ink[double=1,single=0.3],neon=0.5",
        )
        slots = []
        with gr.Accordion("Blend builder: choosing here writes one line for all prompts into Styles", open=True):
            for number in range(1, BLEND_SLOTS + 1):
                with gr.Row():
                    name = gr.Dropdown(choices, value=None, label=f"Style {number}", allow_custom_value=True)
                    weight = gr.Slider(0, 2, value=1.0 if number == 1 else 0.5, step=0.05, label=f"Weight {number}")
                    per_block = gr.Textbox(
                        label=f"Per block {number} (optional; Enter applies)",
                        placeholder="double=1,single=0.3",
                        info=f"times the weight: double=1,single=0.3 · double.0-9=1,*=0 · one value per block "
                        f"({blocks})",
                    )
                slots += [name, weight, per_block]
        with gr.Row():
            button = gr.Button("Generate", variant="primary", scale=3)
            stop = gr.Button("Stop", variant="stop", scale=1)
        images = _image_gallery("Images", "generated", defaults, columns=4)
    return SimpleNamespace(prompts=prompts, styles=styles, slots=slots, button=button, stop=stop, images=images)


def _compare_tab(choices: list[str], defaults: GenerationDefaults) -> SimpleNamespace:
    with gr.Tab("Compare"):
        prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPTS[0], info="one prompt, on one line")
        styles = gr.Dropdown(
            choices,
            value=choices,
            multiselect=True,
            allow_custom_value=True,
            label="Styles to compare",
            info="also a blend like ink=0.5,neon=0.5 or ink[double=1,single=0.3] (type it and press Enter)",
        )
        with gr.Row():
            button = gr.Button("Compare", variant="primary", scale=3)
            stop = gr.Button("Stop", variant="stop", scale=1)
        images = _image_gallery("Same prompt and seed, one image per style", "compared", defaults, columns=4)
    return SimpleNamespace(prompt=prompt, styles=styles, button=button, stop=stop, images=images)


def _manage_tab(styles: list[str], read_only: bool = False) -> SimpleNamespace:
    title = "Save" if read_only else "Merge, delete, save"
    with gr.Tab(title):
        if read_only:
            gr.Markdown(f"*{READ_ONLY_MESSAGE[0].upper()}{READ_ONLY_MESSAGE[1:]}.*", elem_id="read-only-note")
        # Read-only: the controls stay out of sight (their API endpoints answer with the read-only message).
        with gr.Column(visible=not read_only):
            gr.Markdown("**Merge a LoRA** as a new style (any Flux LoRA layout diffusers reads; `.safetensors` only)")
            with gr.Row():
                hub_id = gr.Textbox(label="Hub repo id", placeholder="user/flux-lora")
                weight_name = gr.Textbox(label="File in the repo", placeholder="only if it holds several .safetensors")
            upload = gr.File(
                label="... or upload a LoRA",
                elem_id="lora-upload",
                file_types=[".safetensors"],
                type="filepath",
                height=140,
            )
            style_name = gr.Textbox(label="Style name", placeholder="default: the repo or file name")
            with gr.Row():
                merge = gr.Button("Merge", variant="primary", interactive=not read_only)
                # A merge turns the shared bases, moving every style a little (the report says how much);
                # deleting the new style would not turn them back, this does.
                undo = gr.Button("Undo last merge", interactive=not read_only)
            report = gr.Textbox(label="Merge report", elem_id="merge-report", interactive=False)
            gr.Markdown("**Delete a style**")
            with gr.Row():
                # Custom values: the API (a fresh session) must reach styles merged after the page was built.
                to_delete = gr.Dropdown(styles, value=None, label="Style to delete", allow_custom_value=True)
                delete = gr.Button("Delete", variant="stop", interactive=not read_only)
            status = gr.Textbox(label="Status", interactive=False)
        gr.Markdown("**Save the factors** (a zip of `save_share_factors`; load it with `load_share_factors`)")
        save = gr.Button("Save factors")
        factors_file = gr.File(label="Share factors", interactive=False, height=100)
    return SimpleNamespace(
        hub_id=hub_id,
        weight_name=weight_name,
        upload=upload,
        style_name=style_name,
        merge=merge,
        undo=undo,
        report=report,
        to_delete=to_delete,
        delete=delete,
        status=status,
        save=save,
        factors_file=factors_file,
    )


def build_demo(studio: StyleStudio, description: str = "", max_queue: int = MAX_QUEUE) -> gr.Blocks:
    """The studio's page, wired to ``studio``, its queue holding at most ``max_queue`` requests. Call
    ``.launch(css=CSS, ...)`` on it (not ``.queue()`` again: that would lift the limit)."""
    handlers = Handlers(studio)
    defaults = studio.defaults
    styles = studio.styles()
    choices = style_choices(styles)
    with gr.Blocks(title="Share style studio", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"## Share style studio\n{description}")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs():
                    generate = _generate_tab(choices, defaults, studio.blocks())
                    compare = _compare_tab(choices, defaults)
                    manage = _manage_tab(styles, studio.read_only)
            with gr.Column(scale=2):
                gallery = _image_gallery(
                    "Styles: preview and reconstruction error", "styles", defaults, columns=3, height=340
                )
                with gr.Accordion("Style map: close points are styles with similar weight updates", open=True):
                    style_plot = gr.Plot(show_label=False, elem_id="style-map", format="png")
                    style_table = gr.Markdown(elem_id="style-table")
                settings = _settings(defaults)

        common = [
            settings.style_scale,
            settings.seed,
            settings.randomize,
            settings.steps,
            settings.width,
            settings.height,
            settings.guidance,
        ]
        menus = [*generate.slots[0::3], compare.styles, manage.to_delete]

        def refresh(event):
            event.success(handlers.style_gallery, None, gallery, api_visibility="private")
            event.success(handlers.style_menus, compare.styles, menus, api_visibility="private")
            event.success(handlers.style_overview, None, [style_plot, style_table], api_visibility="private")

        builder = dict(fn=handlers.blend, inputs=generate.slots, outputs=generate.styles, queue=False)
        for slot in generate.slots[0::3]:
            slot.input(**builder, api_visibility="private")
        for slot in generate.slots[1::3]:
            slot.release(**builder, api_visibility="private")
        for slot in generate.slots[2::3]:  # on Enter or leaving the box, not at every key (half-typed text)
            slot.submit(**builder, api_visibility="private")
            slot.blur(**builder, api_visibility="private")
        generating = generate.button.click(
            handlers.generate,
            [generate.prompts, generate.styles, *common],
            [generate.images, settings.seed],
            api_name="generate",
        )
        comparing = compare.button.click(
            handlers.compare,
            [compare.prompt, compare.styles, *common],
            [compare.images, settings.seed],
            api_name="compare",
        )
        # Gradio's cancel drops a queued call but lets a running one finish; handlers.stop ends that one
        # between two denoising steps, so the pipeline is free for the next visitor at once.
        for stop in (generate.stop, compare.stop):
            stop.click(
                handlers.stop, None, None, cancels=[generating, comparing], queue=False, api_visibility="private"
            )
        merge = manage.merge.click(
            handlers.merge_lora,
            [manage.hub_id, manage.weight_name, manage.upload, manage.style_name],
            manage.report,
            api_name="merge_lora",
        )
        refresh(merge)
        merge.failure(handlers.merge_failed, None, manage.report, api_visibility="private")
        refresh(manage.undo.click(handlers.undo_merge, None, manage.report, api_name="undo_merge"))
        refresh(manage.delete.click(handlers.delete_style, manage.to_delete, manage.status, api_name="delete_style"))
        manage.save.click(handlers.save_factors, None, manage.factors_file, api_name="save_factors")
        demo.load(handlers.style_gallery, None, gallery, api_name="styles")
        demo.load(handlers.style_menus, compare.styles, menus, api_visibility="private")
        demo.load(handlers.style_overview, None, [style_plot, style_table], api_name="style_map")
    return demo.queue(max_size=max_queue)


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="share-diffusers app", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        help="Flux repo id or folder (default: the embedded demo model, trained on Fashion-MNIST, no download; "
        f"{TINY_RANDOM}: the random-weight tiny pipeline)",
    )
    parser.add_argument("--factors", help="Share checkpoint folder or Hub repo id to load")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="weights dtype (default: bfloat16 on cuda, float32 otherwise)"
    )
    parser.add_argument(
        "--quantize",
        metavar="KIND_OR_GGUF",
        help="quantize the transformer: int8 or float8 (torchao), nf4 (bitsandbytes, CUDA) or a .gguf file of it; "
        "styles apply unfused on top",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--max-upload-mb",
        type=int,
        default=DEFAULT_MAX_MERGE_MB,
        help=f"largest LoRA file merged, uploaded or from the Hub (default {DEFAULT_MAX_MERGE_MB})",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=MAX_QUEUE,
        help=f"most requests waiting for the pipeline; more are refused with 'queue is full' (default {MAX_QUEUE})",
    )
    parser.add_argument(
        "--read-only",
        action="store_true",
        help="visitors may generate, compare and save, but not merge or delete styles (every visitor shares one bank)",
    )
    parser.add_argument(
        "--demo-styles",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start with demo styles: the shipped inverted/tint/stripes/outlines on the demo model, three random "
        f"LoRAs on {TINY_RANDOM}, merged into --factors if given (default: on unless --factors; the demo model's "
        "cannot go with --factors)",
    )
    return parser


def load_studio(args: argparse.Namespace) -> tuple[StyleStudio, str]:
    """The pipeline with its styles (factors, demo styles), warmed previews, and the page's description."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline(args.model, device, dtype, quantize=args.quantize)
    pipe.set_progress_bar_config(leave=False)
    for report in load_styles(pipe, args.model, args.factors, args.demo_styles):
        print(report, flush=True)
    studio = StyleStudio(
        pipe, defaults_for(pipe, model=args.model), read_only=args.read_only, max_merge_mb=args.max_upload_mb
    )
    studio.previews()  # render them now, not on the first page load
    model = {
        None: "the embedded demo model (a small Flux trained on Fashion-MNIST: try 'a photo of a sneaker', "
        "'a photo of a bag', ...)",
        TINY_RANDOM: "the random-weight tiny Flux pipeline (the pictures are noise, the numbers real)",
    }.get(args.model, args.model)
    description = f"Model: {model} · {device} · {str(dtype).removeprefix('torch.')}"
    return studio, description


def main(argv: Sequence[str] | None = None) -> int:
    """Run the studio until interrupted; returns the exit status (1, with a one-line error, on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.max_queue < 1:
            raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}")
        check_server_options(args.port, args.max_upload_mb)
        studio, description = load_studio(args)
        demo = build_demo(studio, description, max_queue=args.max_queue)
        _, url, _ = demo.launch(
            server_name=args.host,
            server_port=args.port,
            max_file_size=f"{args.max_upload_mb}mb",
            ssr_mode=False,
            css=CSS,
            quiet=True,
            prevent_thread_lock=True,
        )
    except USER_ERRORS as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 1
    print(f"Share style studio running at {url}  (Ctrl+C to stop)", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
