"""A loopback stand-in for an OpenAI-compatible teacher: deterministic replies, optional latency and injected
faults, and a log of every request (item, attempt, start and end time, peak requests in flight)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# What the fault function may return for a request: None (answer normally) or one of these.
FAULTS = ("429", "500", "timeout", "malformed")


_VOCABULARY = [
    "insulin", "statin", "aspirin", "warfarin", "heparin", "asthma", "anaemia", "thyroid", "kidney", "liver", "gout",
    "migraine", "eczema", "angina", "sepsis", "stroke", "fever", "cough", "rash", "oedema", "fatigue", "nausea",
    "dizziness", "tremor", "glucose", "sodium", "potassium", "calcium", "lipids", "platelets", "antibiotics",
    "vaccines", "inhalers", "steroids", "diuretics", "opioids", "antacids", "pregnancy", "infancy", "elderly",
    "smokers", "athletes", "travellers", "students", "farmers", "nurses", "carers", "dialysis", "surgery",
    "physiotherapy", "diet", "sleep", "exercise", "hydration", "monitoring", "dosing", "adherence", "screening",
    "referral", "counselling", "follow-up",
]


def _words(tag: bytes, count: int) -> list[str]:
    return [_VOCABULARY[b % len(_VOCABULARY)] for b in tag[:count]]


def deterministic_reply(step: str, prompt: str) -> str:
    """Text that is a function of the step and prompt only (a seeded teacher), varied from item to item so
    near-duplicate filtering does not remove it, and shaped like what the step asks for."""
    tag = hashlib.sha256(f"{step}\n{prompt}".encode()).digest()
    w = _words(tag, 12)
    kind = step.rstrip("0123456789")
    if kind == "task":
        return f"Explain how {w[0]} and {w[1]} affect {w[2]} for {w[3]} {w[4]}."
    if kind == "rewrite":
        return f"Describe step by step why {w[0]} {w[1]} changes {w[2]} during {w[3]} {w[4]}."
    if kind == "question":
        return f"Which {w[0]} {w[1]} {w[2]} is recommended for {w[3]} {w[4]} {w[5]}?"
    if kind == "judge":
        return f"Score: {tag[0] % 10 + 1}\nA short justification."
    if kind == "sample":  # samples echo 0-3 of the prompt's last words: they agree with a reference unequally
        echo = " ".join(prompt.rstrip(".?!").split()[len(prompt.split()) - tag[6] % 4 :]) if tag[6] % 4 else ""
        return f"{w[0].capitalize()} and {w[1]} matter {echo}; consider {w[2]}, {w[3]} and {w[4]}."
    # answers: reuse the prompt's words so doc-QA grounding passes
    words = [x for x in prompt.replace("\n", " ").split() if x.isalpha()][-12:]
    return f"In short, {' '.join(words)}, with attention to {w[0]} and {w[1]}."


@dataclass
class TeacherServer:
    faults: Callable[[str, int], str | None] = lambda key, attempt: None  # (item#step, attempt from 1)
    latency_s: float = 0.0
    client_timeout_s: float = 1.0
    attempts: dict[str, list[tuple[float, float, int]]] = field(default_factory=lambda: defaultdict(list))
    prompts: dict[str, str] = field(default_factory=dict)  # the last prompt text per request key
    in_flight: int = 0
    peak_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                started = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers.get("X-Llmtune-Item", "?")
                with server.lock:
                    server.in_flight += 1
                    server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
                    attempt = len(server.attempts[key]) + 1
                    server.attempts[key].append((started, 0.0, 0))
                fault = server.faults(key, attempt)
                status = 200
                try:
                    if server.latency_s:
                        time.sleep(server.latency_s)
                    if fault == "timeout":
                        # The client gives up after its timeout: from then on this request is no longer its.
                        time.sleep(server.client_timeout_s)
                        with server.lock:
                            server.in_flight -= 1
                        time.sleep(0.3)
                        status = -1
                        return
                    status = self._answer(fault, key, body)
                finally:
                    with server.lock:
                        if status != -1:
                            server.in_flight -= 1
                        server.attempts[key][attempt - 1] = (started, time.monotonic(), status)

            def _answer(self, fault: str | None, key: str, body: dict) -> int:
                if fault == "429":
                    return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
                if fault == "500":
                    return self._send(500, {"error": {"message": "boom"}})
                if fault == "malformed":
                    return self._send(200, None, raw=b'{"id": "x", "choices": [')
                step = key.split("#")[-1]
                prompt = "\n".join(m["content"] for m in body["messages"])
                server.prompts[key] = prompt
                text = deterministic_reply(step, prompt)
                reply = {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    ],
                    "usage": {
                        "prompt_tokens": len(prompt.split()),
                        "completion_tokens": len(text.split()),
                        "total_tokens": len(prompt.split()) + len(text.split()),
                    },
                }
                return self._send(200, reply)

            def _send(self, status: int, payload, headers=None, raw: bytes | None = None) -> int:
                data = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
                    self.wfile.write(data)
                return status

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
