"""Forms of the browser pages."""

from __future__ import annotations

from django.contrib.auth.forms import UserCreationForm


class SignupForm(UserCreationForm):
    """Django's ``UserCreationForm``, with the password validators' errors (too short,
    too common, all digits...) under the "Password" field people chose it in rather than
    under "Password confirmation", where Django puts them by default
    (``SetPasswordMixin.validate_password_for_user``). A mismatch of the two stays under
    the confirmation. Both password fields come back empty after an error, as Django's
    ``PasswordInput`` renders them: a password is not sent back in the page."""

    def validate_password_for_user(self, user, password_field_name="password1"):
        """Validate the chosen password (``password1``) against ``AUTH_PASSWORD_VALIDATORS``
        for ``user``, adding the errors to that field."""
        if self.has_error("password2"):
            # The two differ: the mismatch alone is said, under the confirmation.
            return
        super().validate_password_for_user(user, password_field_name=password_field_name)
