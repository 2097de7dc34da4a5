"""Rendering conversations in a family's chain-of-thought modes with a tokenizer's chat template.

Tokenizers without a chat template get plain text (user text, newline, reply).
"""

from __future__ import annotations

from vllm_ptq_ascend.recipes.calibration.modes import _chat_template_text
from vllm_ptq_ascend.recipes.calibration.shipped import Item

_SENTINEL = "\u2063CALIBRATION-REPLY\u2063"


class Renderer:
    """Renders conversations in one family's modes with a tokenizer's chat template."""

    def __init__(self, tokenizer, family: dict):
        self.tok = tokenizer
        self.family = family
        self.has_template = bool(_chat_template_text(tokenizer))
        self._turn_end: dict[str, str] = {}

    def mode(self, mode: str | None) -> dict:
        return self.family["modes"][mode] if mode is not None else {}

    def _messages(self, messages: list[dict], mode: str | None) -> list[dict]:
        spec = self.mode(mode)
        msgs = [dict(m) for m in messages]
        if spec.get("system") and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": spec["system"]})
        if spec.get("user_suffix"):
            for m in reversed(msgs):
                if m["role"] == "user":
                    m["content"] = m["content"] + spec["user_suffix"]
                    break
        return msgs

    def _apply(self, messages: list[dict], mode: str | None, generation_prompt: bool) -> str:
        kwargs = dict(self.mode(mode).get("chat_template_kwargs") or {})
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )

    def turn_end(self, mode: str | None) -> str:
        """What the template writes after an assistant message (e.g. "<|im_end|>\\n")."""
        if mode not in self._turn_end:
            end = self.tok.eos_token or ""
            if self.has_template:
                try:
                    text = self._apply(
                        [{"role": "user", "content": "u"}, {"role": "assistant", "content": _SENTINEL}],
                        mode,
                        False,
                    )
                    if _SENTINEL in text:
                        end = text.rsplit(_SENTINEL, 1)[1]
                except Exception:  # templates that refuse this shape: fall back to eos
                    pass
            self._turn_end[mode] = end
        return self._turn_end[mode]

    def prompt(self, messages: list[dict], mode: str | None) -> str:
        """The generation prompt for ``messages`` (the assistant's turn is next)."""
        msgs = self._messages(messages, mode)
        if self.has_template:
            return self._apply(msgs, mode, True)
        return "\n".join(m["content"] for m in msgs) + "\n"

    def join(self, prompt: str, reply: str, mode: str | None, finished: bool = True) -> str:
        """prompt + reply, without repeating a think_open the prompt already ends with."""
        think_open = self.mode(mode).get("think_open") or ""
        if think_open and prompt.endswith(think_open) and reply.startswith(think_open):
            reply = reply[len(think_open) :]
        end = (self.turn_end(mode) if self.has_template else "") if finished else ""
        return prompt + reply + end

    def item_reply(self, item: Item, mode: str | None) -> str:
        spec = self.mode(mode)
        fmt = spec.get("response", "{solution}")
        body = fmt.format(reasoning=item.reasoning, answer=item.answer, solution=item.solution)
        return (spec.get("think_open") or "") + body

    def item_text(self, item: Item, mode: str | None) -> str:
        prompt = self.prompt([{"role": "user", "content": item.question}], mode)
        return self.join(prompt, self.item_reply(item, mode), mode)

    def conversation_text(self, messages: list[dict], mode: str | None) -> str:
        """A whole conversation from a file: the last assistant reply follows the mode's prompt."""
        if messages and messages[-1]["role"] == "assistant":
            prompt = self.prompt(messages[:-1], mode)
            return self.join(prompt, messages[-1]["content"], mode)
        msgs = self._messages(messages, mode)
        if self.has_template:
            return self._apply(msgs, mode, False)
        return "\n".join(m["content"] for m in msgs)

    def encode(self, text: str, templated: bool) -> list[int]:
        # vLLM's convention: a chat-templated prompt carries its own special tokens
        return list(self.tok(text, add_special_tokens=not templated)["input_ids"])
