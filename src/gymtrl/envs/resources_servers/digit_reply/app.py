"""digit_reply: gymtrl's own NeMo Gym resources server, built so a tiny model can learn on CPU.

Task: answer with digits only. Reward: the fraction of the final message's non-space characters
that are digits (partial credit, so a random policy already gets a signal and GRPO can climb it;
an exact-match reward gives a random tiny model almost nothing to learn from).
Runs in the NeMo Gym venv like any built-in server; gymtrl finds it through NEMO_GYM_EXTRA_ROOTS.
"""

from nemo_gym.base_resources_server import (
    BaseResourcesServerConfig,
    BaseVerifyRequest,
    BaseVerifyResponse,
    SimpleResourcesServer,
)


class DigitReplyConfig(BaseResourcesServerConfig):
    pass


class DigitReplyVerifyResponse(BaseVerifyResponse):
    answer_text: str
    digit_fraction: float


def final_message_text(body: BaseVerifyRequest) -> str:
    text = ""
    for item in body.response.output:
        if getattr(item, "type", None) == "message":
            text = "".join(getattr(part, "text", "") or "" for part in item.content)
    return text


def digit_fraction(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


class DigitReplyResourcesServer(SimpleResourcesServer):
    ray_enabled = False
    config: DigitReplyConfig

    async def verify(self, body: BaseVerifyRequest) -> DigitReplyVerifyResponse:
        text = final_message_text(body)
        score = digit_fraction(text)
        return DigitReplyVerifyResponse(**body.model_dump(), reward=score, answer_text=text, digit_fraction=score)


if __name__ == "__main__":
    DigitReplyResourcesServer.run_webserver()
