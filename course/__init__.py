"""Shared helpers for the lessons: the OJS bridge (course.ojs), widgets (course.widgets),
Colab badges and set-up cells (course.colab)."""

from course.ojs import ojs_define

__all__ = ["ojs_define"]
