"""One router per resource: streams, frames, questions, the system routes, the page."""
