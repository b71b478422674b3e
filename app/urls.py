from django.urls import path

from app import views

# ids are matched as text so that a malformed one gets a 400 that says why, not a 404
urlpatterns = [
    path("api/users", views.users),
    path("api/users/<str:user_ref>", views.user_detail),
    path("api/follow", views.follow),
    path("api/photos", views.photos),
    path("api/photos/<str:photo_ref>", views.photo_detail),
    path("api/photos/<str:photo_ref>/image", views.photo_image),
    path("api/photos/<str:photo_ref>/like", views.like),
    path("api/feed", views.feed),
    path("health", views.health),
    path("stats", views.stats),
]

handler400 = views.bad_request
handler404 = views.not_found
handler500 = views.server_error
