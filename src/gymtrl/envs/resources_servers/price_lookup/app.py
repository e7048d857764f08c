"""price_lookup: gymtrl's multi-turn tool environment with generated tasks (see generate.py).

Task: "What do 3 apples and 2 pears cost in total?" The unit prices are random per task (drawn
from the row's seed) and known only to this server: the model has to call `get_price(item)` for
each item (and `calculate(expression)` where a row offers it; the generated rows do not), then answer.
The row carries the hidden data (`items`: name, quantity, price; `total`). The agent's `/run`
posts the row to `/seed_session`, which keeps the prices under the episode's session cookie, so the
tools answer per episode; `/verify` receives the row again with the response and needs no state.

Reward (partial credit, so a small model starts above zero and GRPO has a gradient):

    reward = 0.5 * (needed items looked up) / (items in the task)  +  0.5 * correct

- an item counts as looked up when some `get_price` call in the episode names it (case, spaces,
  a leading "a"/"an"/"the" and plural forms ignored: "Apples" counts for apple); calls for other
  items, repeated calls and `calculate` calls add nothing and cost nothing;
- `correct`: the last number in the episode's final assistant message (commas, a "$" and trailing
  zero cents allowed: "$1,234.00") equals the task's total. No final message: not correct.

So with two items: 0.25 per item looked up, 0.5 for the right total, 1.0 for both. `correct` is
the exact-answer bit for pass@k; `looked_up`, `needed`, `answer` and `tool_calls` say why.
Runs in the NeMo Gym venv like any built-in server; gymtrl finds it through NEMO_GYM_EXTRA_ROOTS.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from typing import Any, Dict, List, Optional

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from nemo_gym.base_resources_server import (
    BaseResourcesServerConfig,
    BaseSeedSessionResponse,
    BaseVerifyRequest,
    BaseVerifyResponse,
    SimpleResourcesServer,
)
from nemo_gym.server_utils import SESSION_ID_KEY

TOOL_CREDIT = 0.5  # split evenly over the task's items
ANSWER_CREDIT = 0.5


class PriceLookupConfig(BaseResourcesServerConfig):
    pass


class Item(BaseModel):
    name: str
    quantity: int
    price: int


class PriceLookupSeedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    items: List[Item] = Field(default_factory=list)
    task_data: Optional[Dict[str, Any]] = None  # an Environment Server's seed carries the row here


class GetPriceRequest(BaseModel):
    item: str = ""


class CalculateRequest(BaseModel):
    expression: str = ""


class PriceLookupVerifyRequest(BaseVerifyRequest):
    items: List[Item]
    total: int


class PriceLookupVerifyResponse(BaseVerifyResponse):
    correct: bool
    answer: Optional[float]
    looked_up: List[str]
    needed: List[str]
    tool_calls: int


ARTICLE = re.compile(r"^(a|an|the)\s+")


def normalize_item(name: Any) -> str:
    """'  The Apples ' -> 'apple'; 'peaches' -> 'peach'; 'potatoes' -> 'potato'."""
    s = ARTICLE.sub("", str(name).strip().lower()).strip()
    if s.endswith("es") and s[:-2].endswith(("ch", "sh", "o", "x")):
        return s[:-2]
    if s.endswith("s") and not s.endswith("ss"):
        return s[:-1]
    return s


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> Optional[float]:
    found = NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
       ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> float:
    """Numbers, + - * / and parentheses; anything else raises ValueError."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers, + - * / and parentheses")
    if len(expression) > 200:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expression.replace("x", "*").replace("×", "*"), mode="eval")
    except SyntaxError:
        raise ValueError("not an arithmetic expression") from None
    return ev(tree)


def score(items: List[Item], total: int, output: List[Any]) -> dict:
    """The reward rule of the module docstring over a response's output items."""
    needed = sorted({normalize_item(i.name) for i in items})
    looked_up, calls, final_text = set(), 0, None
    for item in output:
        kind = getattr(item, "type", None)
        if kind == "function_call":
            calls += 1
            if item.name == "get_price":
                try:
                    args = json.loads(item.arguments)
                except (json.JSONDecodeError, TypeError):
                    continue
                if isinstance(args, dict) and normalize_item(args.get("item", "")) in needed:
                    looked_up.add(normalize_item(args["item"]))
        elif kind == "message" and getattr(item, "role", "assistant") == "assistant":
            final_text = "".join(getattr(part, "text", "") or "" for part in item.content)
    answer = last_number(final_text) if final_text is not None else None
    correct = answer is not None and abs(answer - total) < 1e-6
    reward = TOOL_CREDIT * len(looked_up) / len(needed) + (ANSWER_CREDIT if correct else 0.0)
    return {"reward": reward, "correct": correct, "answer": answer, "looked_up": sorted(looked_up),
            "needed": needed, "tool_calls": calls}


class PriceLookupResourcesServer(SimpleResourcesServer):
    ray_enabled = False
    config: PriceLookupConfig
    prices: Dict[str, Dict[str, int]] = Field(default_factory=dict)  # session id -> item -> price

    def setup_webserver(self) -> FastAPI:
        app = super().setup_webserver()
        app.post("/get_price")(self.get_price)
        app.post("/calculate")(self.calculate)
        return app

    async def seed_session(self, request: Request, body: PriceLookupSeedRequest) -> BaseSeedSessionResponse:
        items = body.items
        if not items and body.task_data:
            items = [Item.model_validate(i) for i in body.task_data.get("items", [])]
        self.prices[request.session[SESSION_ID_KEY]] = {normalize_item(i.name): i.price for i in items}
        return BaseSeedSessionResponse()

    async def get_price(self, request: Request, body: GetPriceRequest) -> dict:
        prices = self.prices.get(request.session[SESSION_ID_KEY], {})
        name = normalize_item(body.item)
        if name in prices:
            return {"item": name, "price": prices[name]}
        return {"error": f"no price for {body.item!r}; ask for one item of the question by name"}

    async def calculate(self, body: CalculateRequest) -> dict:
        try:
            value = calculate(body.expression)
        except (ValueError, ZeroDivisionError, TypeError, RecursionError) as e:
            return {"error": f"{e}"}
        return {"result": int(value) if float(value).is_integer() else round(value, 6)}

    async def verify(self, request: Request, body: PriceLookupVerifyRequest) -> PriceLookupVerifyResponse:
        self.prices.pop(request.session.get(SESSION_ID_KEY), None)  # the episode is over
        result = score(body.items, body.total, body.response.output)
        return PriceLookupVerifyResponse(**body.model_dump(), **result)


if __name__ == "__main__":
    PriceLookupResourcesServer.run_webserver()
