"""Assertions shared by the runner's command-line tests."""


def assert_user_error(capsys, rc, *needles: str, code: int | None = 2) -> str:
    """A user error: exit `code` (any failure when None), 1-3 stderr lines naming `needles`,
    no traceback. Returns the captured stderr."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code is None:
        assert rc not in (0, None), err
    else:
        assert rc == code, err
    assert 1 <= len(lines) <= 3, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err
