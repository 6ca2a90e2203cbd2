"""Streamlit chat for InternVL behind the gateway: what InternVL's streamlit_demo users know, plus a stop button.

Talks only HTTP to the gateway (the FastChat worker protocol), so it also works against InternVL's own workers.
Run: ``streamlit run ui/app.py`` with ``GATEWAY_URL`` (default http://127.0.0.1:8000). A second page,
Operations (``ui/operations.py``, ``REDIS_URL``), shows the queues, workers and dead letters.
"""

from __future__ import annotations

import base64
import io
import json
import os
from typing import Any

import httpx
import streamlit as st
from PIL import Image

from ui import operations
from ui.grounding import draw_boxes, find_boxes

GATEWAY = os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000").rstrip("/")
TOKEN = os.environ.get("GATEWAY_API_TOKEN", "")
DEFAULT_SYSTEM = "You are InternVL, a helpful multimodal assistant."
#: What the demo model (``make demo``'s ``demo-internvl``, trained on drawn pictures) can answer.
DEMO_ABOUT = (
    "**{model}** is a tiny InternVL trained on drawn pictures, not a real model. Upload a picture of one color, "
    "of four colored quadrants (2x2), or of a circle, square or triangle on white, then ask one of these questions. "
    "Colors: red, green, blue, yellow, white, black, orange, purple."
)
DEMO_QUESTIONS = ("What color is the image?", "What color is the top-left part?", "What shape is in the image?")
MAX_IMAGES_PER_TURN = 8


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}


@st.cache_data(ttl=5)  # type: ignore[untyped-decorator]  # streamlit's decorators are untyped
def list_models() -> list[str]:
    try:
        response = httpx.post(f"{GATEWAY}/list_models", headers=headers(), timeout=5)
        return list(response.json().get("models", []))
    except (httpx.HTTPError, ValueError):
        return []


def payload(model: str, system: str, params: dict[str, Any]) -> dict[str, Any]:
    prompt: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for message in st.session_state.messages:
        if message.get("error"):
            continue  # an error shown to the user is not part of the conversation
        item = {"role": message["role"], "content": message["content"]}
        if message["role"] == "user":
            item["image"] = message.get("images", [])
        prompt.append(item)
    prompt.append({"role": "assistant", "content": None})
    return {"model": model, "prompt": prompt, **params}


def stream_answer(body: dict[str, Any], placeholder: Any) -> tuple[str, int]:
    """Show the cumulative text as it streams; returns (text, error_code)."""
    text, code = "", 0
    with httpx.stream(
        "POST", f"{GATEWAY}/worker_generate_stream", json=body, headers=headers(), timeout=httpx.Timeout(10, read=300)
    ) as response:
        st.session_state.job_id = response.headers.get("x-job-id")
        buffer = b""
        for piece in response.iter_bytes():
            buffer += piece
            *frames, buffer = buffer.split(b"\0")
            for frame in frames:
                if not frame.strip():
                    continue
                chunk = json.loads(frame)
                text, code = chunk["text"], chunk["error_code"]
                st.session_state.partial = text  # kept if the user stops (Streamlit ends this run early)
                placeholder.markdown(text + ("" if code else " ▌"))
    return text, code


def sidebar() -> tuple[str | None, str, dict[str, Any]]:
    with st.sidebar:
        st.title("InternVL chat")
        models = list_models()
        model = st.selectbox("Model", models, index=0 if models else None, placeholder="no live worker")
        if model and model.startswith("tiny"):
            st.warning("This is the tiny random-weight test model: its answers are noise by design.")
        if model and model.startswith("demo"):
            demo_examples(model)
        system = st.text_area("System prompt", DEFAULT_SYSTEM, height=80)
        params = {
            "temperature": st.slider("Temperature", 0.0, 1.0, 0.7, 0.05),
            "top_p": st.slider("Top p", 0.0, 1.0, 0.95, 0.05),
            "max_new_tokens": st.slider("Max new tokens", 16, 4096, 1024, 16),
            "max_input_tiles": st.slider("Max input tiles (tile budget)", 1, 24, 12, 1),
            "repetition_penalty": st.slider("Repetition penalty", 1.0, 1.5, 1.1, 0.02),
        }
        if st.button("Clear chat"):
            st.session_state.messages = []
        st.caption(f"Gateway: {GATEWAY}")
    return model, system, params


def demo_examples(model: str) -> None:
    """What the demo model is, and its questions as buttons that ask them (with the images being uploaded)."""
    st.info(DEMO_ABOUT.format(model=model))
    st.caption("Example questions")
    for k, question in enumerate(DEMO_QUESTIONS):
        st.button(question, key=f"example-{k}", on_click=lambda q=question: st.session_state.update(example=q))


def show_grounding(text: str, image: bytes | None) -> None:
    """Answers with <ref>/<box> grounding get the boxes drawn on the latest image, like InternVL's demo."""
    boxes = find_boxes(text)
    if boxes and image is not None:
        st.image(draw_boxes(Image.open(io.BytesIO(image)), boxes), width=480)


def show_history() -> None:
    for k, message in enumerate(st.session_state.messages):
        with st.chat_message(message["role"]):
            for b64 in message.get("images", []):
                st.image(base64.b64decode(b64), width=240)
            if message.get("error"):
                st.error(message["content"])
            else:
                st.markdown(message["content"])
            if message["role"] == "assistant":
                images = [m for m in st.session_state.messages[:k] if m.get("images")]
                show_grounding(message["content"], base64.b64decode(images[-1]["images"][-1]) if images else None)


def main() -> None:
    st.set_page_config(page_title="InternVL chat", page_icon="🖼️", layout="wide")
    st.session_state.setdefault("messages", [])
    st.session_state.setdefault("uploader", 0)
    model, system, params = sidebar()
    if st.session_state.get("job_id") and st.session_state.get("stop_requested"):
        # Stopping reran the script, which closed the stream (the gateway cancels on disconnect); say it too.
        httpx.post(f"{GATEWAY}/jobs/{st.session_state.job_id}/cancel", headers=headers(), timeout=5)
        st.session_state.stop_requested = False
        partial = st.session_state.pop("partial", None)
        if partial is not None and st.session_state.messages and st.session_state.messages[-1]["role"] == "user":
            st.session_state.messages.append({"role": "assistant", "content": f"{partial} *(stopped)*"})
    show_history()
    uploads = st.file_uploader(
        "Images for your next message",
        type=["png", "jpg", "jpeg", "webp", "bmp"],
        accept_multiple_files=True,
        key=f"uploads-{st.session_state.uploader}",
    )
    question = st.chat_input("Ask about the images…", disabled=model is None) or st.session_state.pop("example", None)
    if not question or model is None:
        return
    images = [base64.b64encode(f.getvalue()).decode() for f in (uploads or [])[:MAX_IMAGES_PER_TURN]]
    st.session_state.messages.append({"role": "user", "content": question, "images": images})
    with st.chat_message("user"):
        for b64 in images:
            st.image(base64.b64decode(b64), width=240)
        st.markdown(question)
    with st.chat_message("assistant"):
        st.button("Stop generating", key="stop", on_click=lambda: st.session_state.update(stop_requested=True))
        placeholder = st.empty()
        try:
            text, code = stream_answer(payload(model, system, params), placeholder)
        except httpx.HTTPError as exc:
            text, code = f"Could not reach the gateway at {GATEWAY}: {exc}", 50001
        if code:
            placeholder.error(f"{text} (error_code: {code})")
            st.session_state.messages.append(
                {"role": "assistant", "content": f"{text} (error_code: {code})", "error": True}
            )
        else:
            st.session_state.messages.append({"role": "assistant", "content": text})
        st.session_state.pop("partial", None)
    st.session_state.uploader += 1  # a fresh uploader for the next turn
    st.rerun()


st.navigation(
    [
        st.Page(main, title="Chat", icon=":material/chat:", default=True),
        st.Page(operations.render, title="Operations", icon=":material/monitoring:", url_path="operations"),
    ]
).run()
