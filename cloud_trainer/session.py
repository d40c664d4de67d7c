"""The session state machine: every transition lives here.

    created -> capturing -> uploaded -> training -> rendering -> delivered
          \\________\\___________\\___________\\___________\\-> failed(reason)

A session may also be deleted (the attendee's right): that is not a state of
the pipeline but the end of the row, handled by the deletion code.
"""

from __future__ import annotations

import enum

from edge_agent.errors import BoothError


class State(str, enum.Enum):
    CREATED = "created"
    CAPTURING = "capturing"
    UPLOADED = "uploaded"
    TRAINING = "training"
    RENDERING = "rendering"
    DELIVERED = "delivered"
    FAILED = "failed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.CREATED: frozenset({State.CAPTURING, State.FAILED}),
    State.CAPTURING: frozenset({State.UPLOADED, State.FAILED}),
    State.UPLOADED: frozenset({State.TRAINING, State.FAILED}),
    # A job that is retried after a worker died goes back through training.
    State.TRAINING: frozenset({State.TRAINING, State.RENDERING, State.FAILED}),
    State.RENDERING: frozenset({State.RENDERING, State.DELIVERED, State.FAILED}),
    State.DELIVERED: frozenset(),
    # Staff may retry a failed session from the tablet (e.g. recapture).
    State.FAILED: frozenset({State.CAPTURING}),
}

TERMINAL = frozenset({State.DELIVERED, State.FAILED})


class InvalidTransition(BoothError):
    def __init__(self, session_id: str, current: State, target: State):
        super().__init__(f"session {session_id} cannot go from {current.value} to {target.value}")
        self.current, self.target = current, target


def check_transition(session_id: str, current: State | str, target: State | str) -> None:
    current, target = State(current), State(target)
    if target not in TRANSITIONS[current]:
        raise InvalidTransition(session_id, current, target)
