/* libcurl multi on the libev loop (include/esmd/curl_ev.h). */
#include "esmd/curl_ev.h"
#include "esmd/common.h"

#include <stdio.h>
#include <stdlib.h>

/* One armed socket. */
struct esmd_curl_sock {
    ev_io io; /* first: the watcher is the socket */
    struct esmd_curl_ev *ce;
    struct esmd_curl_sock *prev, *next; /* in ce->socks */
};

static void curl_ev_drain(struct esmd_curl_ev *ce)
{
    CURLMsg *msg;
    int left;
    while (ce->multi && (msg = curl_multi_info_read(ce->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        char *priv = NULL;
        CURL *easy = msg->easy_handle;
        CURLcode result = msg->data.result;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
        ce->done(ce, easy, result, priv);
    }
}

static void curl_ev_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct esmd_curl_sock *sock = (struct esmd_curl_sock *)w;
    struct esmd_curl_ev *ce = sock->ce;
    int flags = 0, running;
    ESMD_UNUSED(loop);
    if (revents & EV_READ)
        flags |= CURL_CSELECT_IN;
    if (revents & EV_WRITE)
        flags |= CURL_CSELECT_OUT;
    if (revents & EV_ERROR)
        flags |= CURL_CSELECT_ERR;
    curl_multi_socket_action(ce->multi, w->fd, flags, &running);
    curl_ev_drain(ce);
}

static void curl_ev_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_curl_ev *ce = w->data;
    int running;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    curl_multi_socket_action(ce->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    curl_ev_drain(ce);
}

static int curl_ev_socket_fn(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    struct esmd_curl_ev *ce = userp;
    struct esmd_curl_sock *sock = socketp;
    ESMD_UNUSED(easy);
    if (what == CURL_POLL_REMOVE) {
        if (sock) {
            ev_io_stop(ce->loop, &sock->io);
            if (sock->prev)
                sock->prev->next = sock->next;
            else
                ce->socks = sock->next;
            if (sock->next)
                sock->next->prev = sock->prev;
            free(sock);
            curl_multi_assign(ce->multi, s, NULL);
        }
        return 0;
    }
    if (!sock) {
        sock = esmd_xcalloc(1, sizeof(*sock));
        sock->ce = ce;
        sock->next = ce->socks;
        if (ce->socks)
            ce->socks->prev = sock;
        ce->socks = sock;
        ev_init(&sock->io, curl_ev_io_cb);
        curl_multi_assign(ce->multi, s, sock);
    } else {
        ev_io_stop(ce->loop, &sock->io);
    }
    int events = 0;
    if (what & CURL_POLL_IN)
        events |= EV_READ;
    if (what & CURL_POLL_OUT)
        events |= EV_WRITE;
    ev_io_set(&sock->io, s, events);
    ev_io_start(ce->loop, &sock->io);
    return 0;
}

static int curl_ev_timer_fn(CURLM *multi, long timeout_ms, void *userp)
{
    struct esmd_curl_ev *ce = userp;
    ESMD_UNUSED(multi);
    ev_timer_stop(ce->loop, &ce->timer);
    if (timeout_ms >= 0) {
        ev_timer_set(&ce->timer, (double)timeout_ms / 1000.0, 0.);
        ev_timer_start(ce->loop, &ce->timer);
    }
    return 0;
}

int esmd_curl_ev_init(struct esmd_curl_ev *ce, struct ev_loop *loop, esmd_curl_done_cb done,
                      void *ud, char *err, size_t errlen)
{
    ce->loop = loop;
    ce->socks = NULL;
    ce->done = done;
    ce->ud = ud;
    ev_init(&ce->timer, curl_ev_timer_cb);
    ce->timer.data = ce;
    ce->multi = curl_multi_init();
    if (!ce->multi) {
        snprintf(err, errlen, "curl_multi_init failed");
        return ESMD_EIO;
    }
    curl_multi_setopt(ce->multi, CURLMOPT_SOCKETFUNCTION, curl_ev_socket_fn);
    curl_multi_setopt(ce->multi, CURLMOPT_SOCKETDATA, ce);
    curl_multi_setopt(ce->multi, CURLMOPT_TIMERFUNCTION, curl_ev_timer_fn);
    curl_multi_setopt(ce->multi, CURLMOPT_TIMERDATA, ce);
    return 0;
}

void esmd_curl_ev_close(struct esmd_curl_ev *ce)
{
    if (ce->multi) {
        curl_multi_cleanup(ce->multi);
        ce->multi = NULL;
    }
    if (ce->loop)
        ev_timer_stop(ce->loop, &ce->timer);
    while (ce->socks) {
        struct esmd_curl_sock *sock = ce->socks;
        ce->socks = sock->next;
        ev_io_stop(ce->loop, &sock->io);
        free(sock);
    }
}
