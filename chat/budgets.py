"""Per-user budgets checked before a generation starts (see UserBudget)."""


def check(user, *, prompt_tokens: int, max_tokens: int) -> None:
    """Raise ``generation.QuotaExceeded`` when ``prompt_tokens + max_tokens`` (tokens)
    would exceed what is left of the user's budget, or ``generation.Busy`` when the
    user already runs ``max_concurrent`` generations. Called inside the transaction
    that creates the assistant row. No limits are enforced yet."""
