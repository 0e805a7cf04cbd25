/* libcurl's multi interface on the libev loop, written once (as hiredis's adapters/libev.h) and
 * shared by the function invoker (src/invoke.c) and the http(s):// destination writer
 * (src/dest_http.c).
 *
 * curl's socket callback only arms one ev_io per socket and its timer callback the one ev_timer
 * (ms / 1000.0); the watchers call curl_multi_socket_action() and then drain
 * curl_multi_info_read(), handing each finished transfer to the owner's callback.
 * CURLOPT_PRIVATE maps a transfer back to its request. Everything runs on the loop thread. */
#ifndef ESMD_CURL_EV_H
#define ESMD_CURL_EV_H

#include <curl/curl.h>
#include <ev.h>

struct esmd_curl_ev;
struct esmd_curl_sock;

/* A transfer finished: easy is still in the multi (the callback removes it, or keeps it there
 * while it decides), result is curl's, priv its CURLOPT_PRIVATE (NULL when unset). */
typedef void (*esmd_curl_done_cb)(struct esmd_curl_ev *ce, CURL *easy, CURLcode result, void *priv);

/* Embedded in its owner; the fields are read-only outside src/curl_ev.c but for ud. */
struct esmd_curl_ev {
    struct ev_loop *loop;
    CURLM *multi;                 /* owned; NULL before init and after close */
    ev_timer timer;               /* curl's timeout */
    struct esmd_curl_sock *socks; /* every armed socket watcher */
    esmd_curl_done_cb done;
    void *ud; /* the owner's */
};

/* Makes the multi handle and wires it to loop. 0, or ESMD_EIO with err. */
int esmd_curl_ev_init(struct esmd_curl_ev *ce, struct ev_loop *loop, esmd_curl_done_cb done,
                      void *ud, char *err, size_t errlen);
/* Cleans up the multi handle (easy handles still in it stay their owners' to clean up, after
 * or before) and stops every watcher. Idempotent; safe on a zeroed struct. */
void esmd_curl_ev_close(struct esmd_curl_ev *ce);

#endif
