"""The two data errors: a bad row's reason (caught per row) and the error a run stops with."""

# Reasons a row is bad; each is counted under `skipped_<reason>` with data.on_bad_row=skip.
BAD_ROW_REASONS = (
    "invalid_json", "missing_field", "wrong_type", "unknown_role", "empty_content",
    "no_assistant_turn", "template_error", "no_trained_tokens",
)


class DataError(ValueError):
    """Bad data or data settings; the message names the file, the line (row) and the problem."""


class BadRow(Exception):
    """One row cannot become an example: `reason` is one of BAD_ROW_REASONS, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        assert reason in BAD_ROW_REASONS, reason
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail
