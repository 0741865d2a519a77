from django.contrib import admin
from django.urls import include, path

from chat.metrics_view import metrics_view
from chat.views import FaviconView

urlpatterns = [
    path("favicon.ico", FaviconView.as_view(), name="favicon"),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("accounts/", include("chat.auth_urls")),
    path("api/", include("chat.api.urls")),
    path("", include("chat.urls")),
]
