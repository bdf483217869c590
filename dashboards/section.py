"""A part of the report's page, shared by dashboards.report and the sections it imports (dashboards.decisions)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field


@dataclass
class Section:
    """A part of the page: HTML snippets and figures, in order. A figure is (div id, go.Figure)."""

    id: str
    title: str
    parts: list = field(default_factory=list)

    def note(self, text: str) -> Section:
        self.parts.append(f'<p class="note">{html.escape(text)}</p>')
        return self
