/* One event source mapping: a record's way from the source to the function and back.
 * See include/esmd/mapping.h.
 *
 * The life of a record, step by step, in the order of this file (as Varnish names the steps of
 * a request); each step names the function that does it:
 *
 *   step    function                 what happens
 *   ------  -----------------------  ---------------------------------------------------------
 *   poll    host_shard_open()        the connector fetches from its shards (the core opens a
 *           host_shard_close()       handle per shard, revoked shards are closed)
 *   emit    host_emit()              the record joins its lane's pending list; too many
 *                                    pending records hold the source or pause the shard
 *                                    (backpressure, hold_or_let_go())
 *   filter  filter_record()          no filter matches: it is acked without being sent
 *   batch   pump() → flush()         pending records of shards with no batch in flight join
 *                                    the forming batch; flushed at batch_size, at the end of
 *                                    the window, or before 6 MB; it becomes an inflight
 *   encode  encode_part()            the connector writes the current part as Lambda's event
 *   invoke  start_part()             POST to the function (records past maximum_record_age
 *                                    are given up first)
 *   settle  on_invoke_result() →     settle_success(): ack; settle_partial(): the records the
 *           settle_success(),        function named in batchItemFailures are retried (streams)
 *           settle_partial(),        or left for redelivery (queues), the others acked;
 *           settle_failure()         settle_failure(): retry, bisect, give up or redeliver;
 *                                    then part_done() → ack → release to the connector
 *
 * What happens after a failure (retries, throttles, maximum_record_age, bisecting, on-failure
 * destinations, the batchItemFailures parser) is in src/mapping_failure.c; what the two share
 * is in src/mapping_private.h. */
#include "mapping_private.h"

#include "esmd/destination.h"
#include "esmd/filter.h"
#include "esmd/invoke.h"
#include "esmd/metrics.h"

#include <cJSON.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Backpressure (docs/design.md#backpressure). The mapping's budget: max(4 x batch_size,
 * MAP_PENDING_MIN_RECORDS) records waiting for a batch, or MAP_PENDING_MAX_BYTES of their
 * encoded size.
 *
 * A source that can be held (ops->hold: Kafka) is held while the shards it fetches (the unpaused
 * ones) have what the budget leaves them waiting, until they are under half of it. A hold that
 * lasts HOLD_MAX_S (a slow or failing function) pauses the shards with the most waiting until the
 * others have room (pause_held_shards) and lets the source go: records of stuck shards never keep
 * the others from being fetched for long, nor the source from being served (a Kafka consumer's
 * rebalances). A paused shard's records are taken from the budget, but the others always have
 * two batches' worth (slowed down to a batch at a time, never to a stop); it resumes once it has
 * less than two batches waiting and half of what it had when paused, or room under the budget.
 * Bound: the budget, plus two batches for each shard paused with records waiting, plus what the
 * connector emits before it sees the hold.
 *
 * Other sources: a shard stops being fetched when max(2 x batch_size, PENDING_MIN_RECORDS) of
 * its records, or PENDING_MAX_BYTES, wait for a batch; and, while the whole mapping has the
 * budget waiting, as soon as it has a full batch waiting. It resumes under half its own limits
 * when the mapping is under half the budget or the shard has less than a batch waiting: stuck
 * shards holding the mapping's budget slow the others down to a batch at a time, never to a
 * stop. */
#define PENDING_MIN_RECORDS 10000
#define PENDING_MAX_BYTES (8u * 1024 * 1024)
#define MAP_PENDING_MIN_RECORDS 50000
#define MAP_PENDING_MAX_BYTES (32u * 1024 * 1024)
#define HOLD_MAX_S 1.0
/* Batches formed at once, at most (a function's max_concurrency may be far more; past this many
 * batches in flight, records gather into fuller batches anyway). */
#define MAX_FORMERS 64

static void start_part(struct inflight *inf);
static void inflight_end(struct inflight *inf, bool nack);

static void release_list(struct esmd_mapping *map, struct esmd_record *rec)
{
    while (rec) {
        struct esmd_record *next = rec->next;
        esmd_mapping_release(map, rec);
        rec = next;
    }
}

/* ---- poll: the connector's shards ---- */

/* The lane's records below next_seq are finished: the shard's watermark (docs/design.md#lanes)
 * goes to the source when it moved. Nothing for a revoked lane. */
static void lane_finished(struct esmd_mapping *map, struct esmd_shard *lane, int64_t next_seq)
{
    if (lane->revoked)
        return;
    int64_t wm = esmd_lane_finish(lane, next_seq);
    if (wm >= 0)
        map->ops->ack(map->conn, lane->parent, wm);
}

static void shard_pause(struct esmd_mapping *map, struct esmd_shard *shard)
{
    if (!shard->paused) {
        shard->paused = true;
        shard->paused_npending = shard->all_npending;
        shard->paused_bytes = shard->all_pending_bytes;
        map->ops->pause(map->conn, shard);
        esmd_series_inc(map->m.pauses, 1);
        ESMD_DEBUG(&map->log, "shard %s paused: %zu records (%zu B) wait", shard->key,
                   shard->all_npending, shard->all_pending_bytes);
    }
}

static void shard_resume(struct esmd_mapping *map, struct esmd_shard *shard)
{
    shard->paused = false;
    map->ops->resume(map->conn, shard);
}

/* Holds or lets go the whole source (sources with ops->hold). */
static void source_hold(struct esmd_mapping *map, bool hold)
{
    if (map->held == hold)
        return;
    map->held = hold;
    map->hold_expired = false;
    if (hold) {
        ev_timer_set(&map->hold_timer, HOLD_MAX_S, 0.0);
        ev_timer_start(map->loop, &map->hold_timer);
        esmd_series_inc(map->m.holds, 1);
    } else {
        ev_timer_stop(map->loop, &map->hold_timer);
    }
    map->ops->hold(map->conn, hold);
    ESMD_DEBUG(&map->log, "source %s: %zu records (%zu B) wait", hold ? "held" : "let go",
               map->npending, map->pending_bytes);
}

static void on_hold_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_mapping *map = w->data;
    ev_timer_stop(loop, w);
    map->hold_expired = true;
    map->dirty = true;
}

/* Do the records of the shards being fetched (npending, of bytes encoded size) fill what the
 * budget leaves them? */
static bool over_budget(const struct esmd_mapping *map, size_t npending, size_t bytes)
{
    return npending >= map->allow_records || bytes >= map->allow_bytes;
}

static struct esmd_shard *host_shard_open(void *core, const char *key, size_t overhead, void *priv)
{
    struct esmd_mapping *map = core;
    struct esmd_shard *shard = esmd_shard_new(key, overhead, priv);
    esmd_shard_set_lanes(shard, map->factor);
    shard->next = map->shards;
    map->shards = shard;
    map->nshards++;
    ESMD_DEBUG(&map->log, "shard %s assigned (%d lanes)", key, shard->nlanes);
    if (!map->enabled) /* disabled through the admin API: fetch nothing */
        shard_pause(map, shard);
    return shard;
}

static void former_stop_if_empty(struct esmd_mapping *map, struct former *f)
{
    if (f->b.nrecords == 0)
        ev_timer_stop(map->loop, &f->window);
}

/* A lane of a revoked shard: its pending and forming records go back; a lane in flight is freed
 * when its batch settles (never acked), the others now. */
static void lane_close(struct esmd_mapping *map, struct esmd_shard *lane)
{
    release_list(map, lane->pending_head);
    lane->pending_head = lane->pending_tail = NULL;
    map->npending -= lane->npending;
    map->pending_bytes -= lane->pending_bytes;
    lane->npending = lane->pending_bytes = 0;
    if (lane->state == ESMD_SHARD_OPEN) {
        struct former *f = lane->former;
        release_list(map, esmd_batch_remove_shard(&f->b, lane));
        lane->state = ESMD_SHARD_IDLE;
        lane->former = NULL;
        former_stop_if_empty(map, f);
    }
    lane->revoked = true;
    lane->priv = NULL;
    if (lane->state != ESMD_SHARD_INFLIGHT)
        esmd_shard_free(lane);
}

static void host_shard_close(void *core, struct esmd_shard *shard)
{
    struct esmd_mapping *map = core;
    for (struct esmd_shard **pp = &map->shards; *pp; pp = &(*pp)->next) {
        if (*pp == shard) {
            *pp = shard->next;
            map->nshards--;
            break;
        }
    }
    shard->next = NULL;
    ESMD_DEBUG(&map->log, "shard %s revoked", shard->key);
    /* lane 0 is the shard itself (it owns the lanes array): last */
    for (int i = shard->nlanes - 1; i >= 0; i--)
        lane_close(map, shard->lanes[i]);
    map->dirty = true;
}

static void host_set_ready(void *core, bool ready, const char *why)
{
    struct esmd_mapping *map = core;
    if (map->ready != ready)
        ESMD_INFO(&map->log, "source %s%s%s", ready ? "ready" : "not ready", why ? ": " : "",
                  why ? why : "");
    map->ready = ready;
    free(map->not_ready_why);
    map->not_ready_why = esmd_xstrdup(why);
}

/* ---- emit, filter: a record arrives ---- */

/* Marks rec `filtered` when no filter matches it (Lambda's filtering, docs/filters.md). */
static void filter_record(struct esmd_mapping *map, struct esmd_record *rec)
{
    rec->filtered = false;
    if (!map->filters[0] || rec->fail)
        return;
    esmd_buf_reset(&map->filter_doc);
    enum esmd_filter_data d = map->ops->filter_doc(map->conn, rec, &map->filter_doc);
    if (!esmd_filter_match(map->filters[d], map->filter_doc.data, map->filter_doc.len)) {
        rec->filtered = true;
        esmd_series_inc(map->m.filtered, 1);
    }
}

/* The lane of rec in its shard: by its key, or by its position when it has none. */
static struct esmd_shard *lane_of(struct esmd_mapping *map, struct esmd_shard *shard,
                                  const struct esmd_record *rec)
{
    if (shard->nlanes == 1)
        return shard;
    const void *key = NULL;
    size_t len = 0;
    if (map->ops->record_key)
        map->ops->record_key(map->conn, rec, &key, &len);
    return shard->lanes[esmd_lane_index(key, len, rec->seq, shard->nlanes)];
}

static void host_emit(void *core, struct esmd_shard *shard, struct esmd_record *rec)
{
    struct esmd_mapping *map = core;
    rec->shard = shard;
    rec->next = NULL;
    map->nheld++;
    esmd_series_inc(map->m.polled, 1);
    if (map->stopping) {
        esmd_mapping_release(map, rec);
        return;
    }
    struct esmd_shard *lane = lane_of(map, shard, rec);
    rec->shard = lane;
    esmd_lane_emitted(lane, rec->seq);
    filter_record(map, rec);
    if (lane->pending_tail)
        lane->pending_tail->next = rec;
    else
        lane->pending_head = rec;
    lane->pending_tail = rec;
    lane->npending++;
    lane->pending_bytes += rec->size;
    shard->all_npending++;
    shard->all_pending_bytes += rec->size;
    map->npending++;
    map->pending_bytes += rec->size;
    if (map->ops->hold) {
        /* (paused_*: as of the last pump, which a revoke may have made larger) */
        size_t n = map->npending > map->paused_records ? map->npending - map->paused_records : 0;
        size_t b =
            map->pending_bytes > map->paused_bytes ? map->pending_bytes - map->paused_bytes : 0;
        if (!map->held && !shard->paused && over_budget(map, n, b))
            source_hold(map, true);
    } else if (shard->all_npending >= map->pending_high ||
               shard->all_pending_bytes >= PENDING_MAX_BYTES ||
               (map->npending >= map->map_pending_high &&
                shard->all_npending >= (size_t)map->batch_size)) {
        shard_pause(map, shard);
    }
    map->dirty = true;
}

/* ---- batch: pending records into batches ---- */

static void inflight_link(struct esmd_mapping *map, struct inflight *inf)
{
    ev_init(&inf->retry, NULL);
    inf->retry.data = inf;
    inf->next = map->inflight;
    if (map->inflight)
        map->inflight->prev = inf;
    map->inflight = inf;
    map->ninflight++;
    esmd_series_set(map->m.inflight, (double)map->ninflight);
}

/* A new inflight holding the lanes of `batch` (taken over). */
static struct inflight *inflight_new(struct esmd_mapping *map, struct esmd_batch *batch)
{
    struct inflight *inf = esmd_xcalloc(1, sizeof(*inf));
    inf->map = map;
    inf->batch = *batch;
    esmd_batch_init(batch, &inf->batch.lim);
    inf->nshards = inf->batch.ngroups;
    inf->shards = esmd_xcalloc(inf->nshards ? inf->nshards : 1, sizeof(*inf->shards));
    for (size_t i = 0; i < inf->batch.ngroups; i++) {
        struct esmd_shard *shard = inf->batch.groups[i].shard;
        inf->shards[i] = shard;
        shard->state = ESMD_SHARD_INFLIGHT;
        shard->former = NULL;
        shard->refs++;
    }
    inf->last_status = -1;
    inflight_link(map, inf);
    return inf;
}

static void flush(struct esmd_mapping *map, struct former *f)
{
    ev_timer_stop(map->loop, &f->window);
    if (f->b.nrecords == 0)
        return;
    struct inflight *inf = inflight_new(map, &f->b);
    esmd_series_inc(map->m.batches, 1);
    start_part(inf);
}

static void flush_all(struct esmd_mapping *map)
{
    for (size_t i = 0; i < map->nformers; i++)
        flush(map, &map->formers[i]);
}

static void on_window(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct former *f = w->data;
    ev_timer_stop(loop, w);
    flush(f->map, f);
    f->map->dirty = true;
}

/* A filtered-out record is finished without being sent: with the batch its lane is forming
 * (whose ack position moves past it), or at once when the lane has nothing outstanding (pump
 * only takes records of lanes with no batch in flight). */
static void skip_record(struct esmd_mapping *map, struct esmd_shard *lane, struct esmd_record *rec)
{
    int64_t next = rec->seq + 1;
    if (lane->state == ESMD_SHARD_OPEN) {
        /* Earlier records of the lane are in its forming batch: move its ack past this one. */
        struct former *f = lane->former;
        for (size_t i = 0; i < f->b.ngroups; i++)
            if (f->b.groups[i].shard == lane)
                f->b.groups[i].ack_seq = next;
    } else {
        lane_finished(map, lane, next);
    }
    esmd_mapping_release(map, rec);
}

/* A record over the 6 MB cap on its own can never be sent, nor one the connector could not
 * decode (rec->fail): its lane is idle (pump flushed what came before it), so it becomes a
 * batch of its own that is given up at once. */
static void give_up_alone(struct esmd_mapping *map, struct esmd_record *rec)
{
    const char *condition = rec->fail;
    if (condition) {
        esmd_series_inc(map->m.undecodable, 1);
    } else {
        condition = "MaximumPayloadSizeExceeded";
        esmd_series_inc(map->m.oversized, 1);
        ESMD_ERROR(&map->log, "record %s@%lld is %zu bytes encoded, over the %d-byte payload cap",
                   rec->shard->key, (long long)rec->seq, rec->size, ESMD_MAX_PAYLOAD);
    }
    struct esmd_batch one;
    esmd_batch_init(&one, &map->formers[0].b.lim);
    esmd_batch_add(&one, rec);
    struct inflight *inf = inflight_new(map, &one);
    esmd_mapping_give_up(inf, condition);
}

/* Does f hold records of another lane of lane's shard? (A batch holds one lane per shard: the
 * grouped Kafka event has one group per partition.) */
static bool holds_sibling(const struct former *f, const struct esmd_shard *lane)
{
    const struct esmd_shard *parent = lane->parent;
    for (int i = 0; i < parent->nlanes; i++) {
        const struct esmd_shard *l = parent->lanes[i];
        if (l != lane && l->state == ESMD_SHARD_OPEN && l->former == f)
            return true;
    }
    return false;
}

/* The forming batch an idle lane's records join. A batch of its own when the lane has a full
 * batch waiting, or no forming batch can take it, and the function has free concurrency for
 * one more (max_concurrency less the mapping's batches in flight and forming); else the fullest
 * forming batch that holds no other lane of its shard: batches are filled a lane after another,
 * so each holds few lanes and the others stay free for the next batches, and a lane with a few
 * records does not hold a batch of its own open while others fill. NULL: none can take it
 * now. */
static struct former *pick_former(struct esmd_mapping *map, const struct esmd_shard *lane)
{
    long limit = (long)esmd_function_max_concurrency(map->fn) - (long)map->ninflight;
    if (limit < 1)
        limit = 1;
    if ((size_t)limit > map->nformers)
        limit = (long)map->nformers;
    long used = 0;
    struct former *best = NULL, *empty = NULL;
    for (size_t i = 0; i < map->nformers; i++) {
        struct former *f = &map->formers[i];
        if (f->b.nrecords == 0) {
            if (!empty)
                empty = f;
            continue;
        }
        used++;
        if (!holds_sibling(f, lane) && (!best || f->b.nrecords > best->b.nrecords))
            best = f;
    }
    if (used < limit && empty && (!best || lane->npending >= (size_t)map->batch_size))
        return empty;
    return best;
}

/* A shard whose lane count is to change (a new parallelization_factor) is re-laned once every
 * lane of it is drained; it stays paused until then, so no key's order is broken. */
static void relane_if_drained(struct esmd_mapping *map, struct esmd_shard *shard)
{
    if (!shard->relane || !esmd_shard_drained(shard))
        return;
    esmd_shard_set_lanes(shard, map->factor);
    shard->relane = false;
    ESMD_INFO(&map->log, "shard %s now has %d lanes", shard->key, shard->nlanes);
}

/* Moves a lane's pending records into forming batches. Returns false when the lane waited for a
 * forming batch that could take it. */
static bool pump_lane(struct esmd_mapping *map, struct esmd_shard *lane)
{
    struct esmd_shard *parent = lane->parent;
    while (lane->pending_head && lane->state != ESMD_SHARD_INFLIGHT) {
        struct esmd_record *rec = lane->pending_head;
        struct former *f = lane->state == ESMD_SHARD_OPEN ? lane->former : NULL;
        enum esmd_batch_fit fit = ESMD_BATCH_FITS;
        if (rec->fail && lane->state == ESMD_SHARD_OPEN) {
            flush(map, f); /* what came before it goes first */
            continue;
        } else if (rec->fail) {
            fit = ESMD_BATCH_TOO_BIG; /* given up alone */
        } else if (!rec->filtered) {
            if (!f && !(f = pick_former(map, lane)))
                return false;
            fit = esmd_batch_check(&f->b, rec);
            if (fit == ESMD_BATCH_FULL ||
                (fit == ESMD_BATCH_TOO_BIG && lane->state == ESMD_SHARD_OPEN)) {
                flush(map, f);
                continue; /* the lane may now be in flight, or start the next batch */
            }
        }
        lane->pending_head = rec->next;
        if (!lane->pending_head)
            lane->pending_tail = NULL;
        lane->npending--;
        lane->pending_bytes -= rec->size;
        parent->all_npending--;
        parent->all_pending_bytes -= rec->size;
        map->npending--;
        map->pending_bytes -= rec->size;
        if (rec->filtered) {
            skip_record(map, lane, rec);
            continue;
        }
        if (fit == ESMD_BATCH_TOO_BIG) {
            give_up_alone(map, rec);
            break; /* the lane is in flight now */
        }
        if (f->b.nrecords == 0) {
            f->b.opened_mono_ms = (int64_t)(ev_now(map->loop) * 1000.0);
            if (map->window_ms > 0) {
                ev_timer_set(&f->window, (double)map->window_ms / 1000.0, 0.0);
                ev_timer_start(map->loop, &f->window);
            }
        }
        esmd_batch_add(&f->b, rec);
        lane->state = ESMD_SHARD_OPEN;
        lane->former = f;
        if (esmd_batch_count_reached(&f->b))
            flush(map, f);
    }
    return true;
}

/* What the budget leaves the shards being fetched, the paused ones holding paused_n records of
 * paused_b bytes: the budget less theirs, but always two batches (a stuck shard slows the others
 * down to a batch at a time, never to a stop). */
static void allowance(const struct esmd_mapping *map, size_t paused_n, size_t paused_b,
                      size_t *allow_n, size_t *allow_b)
{
    size_t floor_n = 2 * (size_t)map->batch_size, floor_b = 2 * (size_t)ESMD_MAX_PAYLOAD;
    *allow_n =
        map->map_pending_high > paused_n + floor_n ? map->map_pending_high - paused_n : floor_n;
    *allow_b =
        MAP_PENDING_MAX_BYTES > paused_b + floor_b ? MAP_PENDING_MAX_BYTES - paused_b : floor_b;
}

static void set_allowance(struct esmd_mapping *map, size_t paused_n, size_t paused_b)
{
    map->paused_records = paused_n;
    map->paused_bytes = paused_b;
    allowance(map, paused_n, paused_b, &map->allow_records, &map->allow_bytes);
}

/* Do the records of the shards being read (n, of b bytes) leave room under the budget, that is,
 * at most half of what it leaves them (the paused shards holding paused_n records of paused_b
 * bytes)? Where a held source is let go. */
static bool under_half(const struct esmd_mapping *map, size_t n, size_t b, size_t paused_n,
                       size_t paused_b)
{
    size_t allow_n, allow_b;
    allowance(map, paused_n, paused_b, &allow_n, &allow_b);
    return n <= allow_n / 2 && b <= allow_b / 2;
}

/* A hold lasted HOLD_MAX_S: pauses the shards with the most records waiting, one after another,
 * until the others have room under the budget, so that the source is let go and served
 * (docs/design.md#backpressure). */
static void pause_held_shards(struct esmd_mapping *map, size_t *pn, size_t *pb)
{
    for (;;) {
        size_t paused_n = 0, paused_b = 0;
        struct esmd_shard *most = NULL;
        double most_share = 0;
        for (struct esmd_shard *shard = map->shards; shard; shard = shard->next) {
            if (shard->paused) {
                paused_n += shard->all_npending;
                paused_b += shard->all_pending_bytes;
                continue;
            }
            double share = (double)shard->all_npending / (double)map->map_pending_high;
            double share_b = (double)shard->all_pending_bytes / (double)MAP_PENDING_MAX_BYTES;
            if (share_b > share)
                share = share_b;
            if (shard->all_npending > 0 && (!most || share > most_share)) {
                most = shard;
                most_share = share;
            }
        }
        if (!most || under_half(map, map->npending - paused_n, map->pending_bytes - paused_b,
                                paused_n, paused_b)) {
            *pn = paused_n;
            *pb = paused_b;
            return;
        }
        shard_pause(map, most);
    }
}

/* The budget for a source that can be held (see the top of this file): holds the source, lets
 * it go, pauses the shards of a hold that lasted, resumes them. */
static void hold_or_let_go(struct esmd_mapping *map)
{
    bool expired = map->held && map->hold_expired;
    if (expired)
        source_hold(map, false);
    size_t paused_n = 0, paused_b = 0;
    for (struct esmd_shard *shard = map->shards; shard; shard = shard->next) {
        if (shard->paused) {
            paused_n += shard->all_npending;
            paused_b += shard->all_pending_bytes;
        }
    }
    /* A paused shard with less than two batches waiting resumes once it has at most half of what
     * it had when paused, or once the shards being read, it among them, have room under the
     * budget (so a shard a lasting hold just paused is not resumed at once, the source held again
     * without being served; and a shard whose stuck key holds most of its records is read again
     * while the others leave room). */
    for (struct esmd_shard *shard = map->shards; shard && !map->held; shard = shard->next) {
        size_t n = shard->all_npending, b = shard->all_pending_bytes;
        if (!shard->paused || shard->relane || n >= 2 * (size_t)map->batch_size ||
            b >= MAP_PENDING_MAX_BYTES / 2)
            continue;
        bool fits = under_half(map, map->npending - paused_n + n, map->pending_bytes - paused_b + b,
                               paused_n - n, paused_b - b);
        if (fits || (n <= shard->paused_npending / 2 && b <= shard->paused_bytes / 2)) {
            shard_resume(map, shard);
            paused_n -= n;
            paused_b -= b;
        }
    }
    if (expired)
        pause_held_shards(map, &paused_n, &paused_b);
    /* What the paused shards hold is taken from the budget. */
    set_allowance(map, paused_n, paused_b);
    size_t n = map->npending - paused_n, b = map->pending_bytes - paused_b;
    if (!map->held && over_budget(map, n, b))
        source_hold(map, true);
    else if (map->held && n <= map->allow_records / 2 && b <= map->allow_bytes / 2)
        source_hold(map, false);
}

/* Moves pending records into batches; runs once per loop turn, before the loop sleeps. */
static void pump(struct esmd_mapping *map)
{
    if (map->stopping || !map->enabled)
        return;
    for (bool again = true; again;) {
        bool waited = false;
        for (struct esmd_shard *shard = map->shards; shard; shard = shard->next) {
            relane_if_drained(map, shard);
            for (int i = 0; i < shard->nlanes; i++)
                waited |= !pump_lane(map, shard->lanes[i]);
            relane_if_drained(map, shard);
            if (map->ops->hold)
                continue; /* hold_or_let_go() */
            if (shard->paused && !shard->relane && shard->all_npending <= map->pending_high / 2 &&
                shard->all_pending_bytes <= PENDING_MAX_BYTES / 2 &&
                (map->npending <= map->map_pending_high / 2 ||
                 shard->all_npending < (size_t)map->batch_size))
                shard_resume(map, shard);
        }
        /* Without a window the batches go now; lanes that waited for a batch (another lane of
         * their shard was in each) start the next ones. */
        again = false;
        if (map->window_ms == 0) {
            for (size_t i = 0; i < map->nformers; i++)
                again |= waited && map->formers[i].b.nrecords > 0;
            flush_all(map);
        }
    }
    if (map->ops->hold)
        hold_or_let_go(map);
    esmd_series_set(map->m.pending, (double)map->npending);
}

static void on_prepare(struct ev_loop *loop, ev_prepare *w, int revents)
{
    struct esmd_mapping *map = w->data;
    if (!map->dirty)
        return;
    map->dirty = false;
    pump(map);
}

/* ---- encode ---- */

static char *idempotency_key(const struct esmd_mapping *map, const struct esmd_batch *batch)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_puts(&b, map->cfg->name);
    esmd_buf_putc(&b, '/');
    for (size_t i = 0; i < batch->ngroups; i++) {
        const struct esmd_batch_group *g = &batch->groups[i];
        esmd_buf_printf(&b, "%s%s:%lld-%lld", i ? "," : "", g->shard->key, (long long)g->head->seq,
                        (long long)g->tail->seq);
    }
    if (b.len > 200) {
        /* Too long for a header worth sending: FNV-1a of the same coordinates. */
        uint64_t h = 1469598103934665603ULL;
        for (size_t i = 0; i < b.len; i++)
            h = (h ^ (unsigned char)b.data[i]) * 1099511628211ULL;
        esmd_buf_reset(&b);
        esmd_buf_printf(&b, "%s/%zu-shards-%016llx", map->cfg->name, batch->ngroups,
                        (unsigned long long)h);
    }
    return esmd_buf_steal(&b, NULL);
}

/* Writes the current part's event (once per part: retries send the same bytes). */
static void encode_part(struct inflight *inf)
{
    struct esmd_mapping *map = inf->map;
    if (inf->encoded)
        return;
    esmd_buf_reset(&inf->body);
    map->ops->encode(map->conn, &inf->batch, &inf->body);
    if (inf->body.len != esmd_batch_bytes(&inf->batch))
        ESMD_ERROR(&map->log, "encoder wrote %zu bytes, expected %zu (bug)", inf->body.len,
                   esmd_batch_bytes(&inf->batch));
    free(inf->idem_key);
    inf->idem_key = idempotency_key(map, &inf->batch);
    inf->encoded = true;
}

/* ---- system logs ---- */

void esmd_mapping_processing_event(struct inflight *inf, const char *request_id, const char *code,
                                   const char *message, const char *action)
{
    struct esmd_mapping *map = inf->map;
    if (!esmd_esm_log_enabled(map->cfg->system_log_level, ESMD_ESM_PROCESSING))
        return;
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_puts(&b, ",\"error\":{\"errorCode\":");
    esmd_buf_put_json_string(&b, code, strlen(code));
    esmd_buf_puts(&b, ",\"errorMessage\":");
    esmd_buf_put_json_string(&b, message ? message : "", message ? strlen(message) : 0);
    esmd_buf_printf(&b, "},\"action\":\"%s\",\"batchSize\":%zu,\"invokeCount\":%d", action,
                    inf->batch.nrecords, inf->invokes);
    struct esmd_log_ctx ctx = esmd_mapping_part_log(inf, request_id);
    esmd_esm_log(map->cfg->system_log_level, &ctx, ESMD_ESM_PROCESSING, b.data, b.len);
    esmd_buf_free(&b);
}

const char *esmd_mapping_error_code(const struct esmd_invoke_result *res)
{
    switch (res->outcome) {
    case ESMD_INVOKE_FUNCTION_ERROR:
        return "FunctionError";
    case ESMD_INVOKE_TIMEOUT:
        return "FunctionTimeout";
    case ESMD_INVOKE_THROTTLED:
        return "Throttled";
    case ESMD_INVOKE_OK:
        return "BatchItemFailures"; /* some records failed, or the answer was not usable */
    default:
        return res->status > 0 ? "FunctionErrorStatus" : "FunctionUnreachable";
    }
}

/* POLLER_STATUS_EVENT of the mapping as a whole (every source): started, stopping. */
static void poller_event(struct esmd_mapping *map, const char *status)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_printf(&b, ",\"pollerStatus\":\"%s\",\"source\":\"%s\"", status, map->ops->kind);
    esmd_esm_log(map->cfg->system_log_level, &map->log, ESMD_ESM_POLLER_STATUS, b.data, b.len);
    esmd_buf_free(&b);
}

/* ---- invoke ---- */

static void on_invoke_result(void *ud, const struct esmd_invoke_result *res);

/* A batch of records of several traces is sent with the trace of its first record that has one
 * (each record keeps its own in the event where the source's event has a place for it):
 * docs/operations.md#trace-context says why. */
void esmd_mapping_part_trace(struct inflight *inf)
{
    struct esmd_mapping *map = inf->map;
    esmd_trace_clear(&inf->trace);
    inf->trace_id[0] = '\0';
    if (!map->ops->trace)
        return;
    for (size_t g = 0; g < inf->batch.ngroups; g++)
        for (struct esmd_record *r = inf->batch.groups[g].head; r; r = r->next) {
            if (map->ops->trace(map->conn, r, &inf->trace)) {
                esmd_trace_complete(&inf->trace);
                esmd_trace_id(&inf->trace, inf->trace_id);
                return;
            }
            if (r == inf->batch.groups[g].tail)
                break;
        }
}

static bool keep_owned(void *ctx, size_t i, const struct esmd_record *r)
{
    (void)ctx;
    (void)i;
    return !r->shard->revoked;
}

/* Records of lanes the connector lost (a Kafka partition revoked by a rebalance) are not sent
 * again: their new owner reads them again (docs/kafka.md#rebalances-and-scaling-out). They are
 * split off the current part and dropped, unacked; true when nothing of the part was left. */
static bool drop_revoked(struct inflight *inf)
{
    bool any = false, all = true;
    for (size_t i = 0; i < inf->batch.ngroups; i++) {
        bool r = inf->batch.groups[i].shard->revoked;
        any = any || r;
        all = all && r;
    }
    if (!any)
        return false;
    if (all) {
        ESMD_INFO(&inf->map->log, "batch of %zu records of revoked shards dropped, not sent again",
                  inf->batch.nrecords);
        esmd_mapping_part_done(inf, false);
        return true;
    }
    esmd_mapping_split_part(inf, keep_owned, NULL); /* the revoked ones are the next part */
    return false;
}

/* Sends the current part, after dropping records of revoked shards and giving up records past
 * maximum_record_age. */
static void start_part(struct inflight *inf)
{
    struct esmd_mapping *map = inf->map;
    if (map->stopping) {
        inflight_end(inf, true);
        return;
    }
    if (drop_revoked(inf))
        return;
    if (esmd_mapping_give_up_expired(inf))
        return;
    encode_part(inf);
    esmd_mapping_part_trace(inf);
    esmd_series_inc(map->m.invoked, (double)inf->batch.nrecords);
    inf->req = esmd_invoke_start_traced(map->fn, inf->body.data, inf->body.len, inf->idem_key,
                                        map->cfg->name, &inf->trace, on_invoke_result, inf);
}

static void on_retry_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct inflight *inf = w->data;
    ev_timer_stop(loop, w);
    if (inf->map->stopping) { /* armed after the stop began: nothing more is sent or stored */
        inflight_end(inf, true);
        return;
    }
    if (inf->condition) { /* the on-failure records could not be stored: again */
        esmd_mapping_give_up(inf, inf->condition);
        return;
    }
    if (inf->next_part_is_retry)
        esmd_series_inc(inf->map->m.retries, 1);
    start_part(inf);
}

/* From the loop, never from inside an invoke or store callback. */
void esmd_mapping_schedule_part(struct inflight *inf, int64_t delay_ms, bool retry)
{
    ev_timer_init(&inf->retry, on_retry_timer, (double)delay_ms / 1000.0, 0.0);
    inf->retry.data = inf;
    inf->next_part_is_retry = retry;
    ev_timer_start(inf->map->loop, &inf->retry);
}

/* ---- settle ---- */

static void set_last_result(struct esmd_mapping *map, const char *fmt, ...) ESMD_PRINTF(2, 3);
static void set_last_result(struct esmd_mapping *map, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(map->last_result, sizeof(map->last_result), fmt, ap);
    va_end(ap);
}

static void inflight_unlink(struct inflight *inf)
{
    struct esmd_mapping *map = inf->map;
    if (inf->prev)
        inf->prev->next = inf->next;
    else
        map->inflight = inf->next;
    if (inf->next)
        inf->next->prev = inf->prev;
    map->ninflight--;
    esmd_series_set(map->m.inflight, (double)map->ninflight);
}

static void release_part(struct esmd_mapping *map, struct esmd_batch *part)
{
    for (size_t i = 0; i < part->ngroups; i++)
        release_list(map, part->groups[i].head);
    esmd_batch_clear(part);
}

/* Queue sources: hands a part's records back to the source (not deleted, redelivered). */
static void nack_part(struct esmd_mapping *map, const struct esmd_batch *part)
{
    if (!map->ops->nack)
        return;
    for (size_t i = 0; i < part->ngroups; i++) {
        const struct esmd_batch_group *g = &part->groups[i];
        if (g->shard->revoked)
            continue;
        /* done with as far as the core goes: the watermark may pass them (not acked) */
        esmd_lane_finish(g->shard, g->tail->seq + 1);
        map->ops->nack(map->conn, g->shard->parent, g->tail->seq + 1);
    }
}

/* The whole inflight ends: its parts are done (or given back with `nack`); the shards are free. */
static void inflight_end(struct inflight *inf, bool nack)
{
    struct esmd_mapping *map = inf->map;
    ev_timer_stop(map->loop, &inf->retry);
    inflight_unlink(inf);
    if (nack)
        nack_part(map, &inf->batch);
    release_part(map, &inf->batch);
    while (inf->ntodo > 0) {
        struct esmd_batch *part = &inf->todo[--inf->ntodo];
        if (nack)
            nack_part(map, part);
        release_part(map, part);
    }
    for (size_t i = 0; i < inf->nshards; i++) {
        struct esmd_shard *shard = inf->shards[i];
        shard->refs--;
        shard->state = ESMD_SHARD_IDLE;
        if (shard->revoked && shard->refs == 0)
            esmd_shard_free(shard);
    }
    free(inf->shards);
    free(inf->todo);
    esmd_buf_free(&inf->body);
    free(inf->idem_key);
    free(inf->last_function_error);
    free(inf->last_request_id);
    free(inf->last_error);
    map->dirty = true;
    if (inf->dest_pending > 0) {
        /* esmd_mapping_free with on-failure records still being stored: the destinations call
         * back later, so inf outlives the mapping, detached, until the last answer
         * (on_failure_stored, src/mapping_failure.c) */
        inf->map = NULL;
        return;
    }
    free(inf);
}

/* The current part is finished (acked when `ack`); goes on with the next part, or ends. */
void esmd_mapping_part_done(struct inflight *inf, bool ack)
{
    struct esmd_mapping *map = inf->map;
    for (size_t i = 0; i < inf->batch.ngroups; i++) {
        struct esmd_batch_group *g = &inf->batch.groups[i];
        if (ack)
            lane_finished(map, g->shard, g->ack_seq);
    }
    release_part(map, &inf->batch);
    inf->condition = NULL;
    if (inf->ntodo == 0) {
        inflight_end(inf, false);
        return;
    }
    inf->batch = inf->todo[--inf->ntodo];
    inf->encoded = false;
    esmd_mapping_part_begin(inf);
    esmd_mapping_schedule_part(inf, 0, false);
}

static void remember_response(struct inflight *inf, const struct esmd_invoke_result *res)
{
    inf->invokes++;
    inf->last_status = res->status;
    free(inf->last_function_error);
    inf->last_function_error = NULL;
    if (res->function_error)
        inf->last_function_error = esmd_xstrdup(res->function_error);
    else if (res->outcome != ESMD_INVOKE_OK)
        inf->last_function_error = esmd_xstrdup("Unhandled");
    free(inf->last_request_id);
    inf->last_request_id = esmd_xstrdup(res->request_id);
    free(inf->last_error);
    inf->last_error = NULL;
    if (res->outcome != ESMD_INVOKE_OK) /* for the console (mapping_watch.c); 4 KB at most */
        inf->last_error =
            res->body_len > 0
                ? esmd_xstrndup(res->body, res->body_len < 4096 ? res->body_len : 4096)
                : esmd_xstrdup(res->error ? res->error : "failed");
}

static void settle_success(struct inflight *inf)
{
    set_last_result(inf->map, "OK");
    esmd_mapping_part_done(inf, true);
}

/* The whole part failed: a function error, an error, a timeout, or (outcome OK, `why` set) a
 * batchItemFailures answer that cannot be used. */
static void settle_failure(struct inflight *inf, const struct esmd_invoke_result *res,
                           const char *why)
{
    struct esmd_mapping *map = inf->map;
    if (res->outcome == ESMD_INVOKE_FUNCTION_ERROR) {
        set_last_result(map, "PROBLEM: Function call failed: %s",
                        res->function_error ? res->function_error : "function error");
    } else if (res->outcome == ESMD_INVOKE_TIMEOUT) {
        set_last_result(map, "PROBLEM: Function call timed out");
    } else if (res->outcome != ESMD_INVOKE_OK) {
        set_last_result(map, "PROBLEM: Function call failed: %s",
                        res->error ? res->error : "error");
    }
    esmd_series_inc(map->m.failed, (double)inf->batch.nrecords);

    if (map->ops->queue) {
        /* Queue semantics: the source redelivers the batch after its visibility timeout. */
        struct esmd_log_ctx ctx = esmd_mapping_part_log(inf, res->request_id);
        const char *reason =
            why ? why
                : (res->error ? res->error
                              : (res->function_error ? res->function_error : "failed"));
        esmd_log_limited(ESMD_LOG_WARN, &ctx, "batch-failed",
                         "batch of %zu messages (%s) %s: %s; left for redelivery",
                         inf->batch.nrecords, inf->idem_key, esmd_invoke_outcome_name(res->outcome),
                         reason);
        esmd_mapping_processing_event(inf, res->request_id, esmd_mapping_error_code(res), reason,
                                      "REDELIVER");
        inflight_end(inf, true);
        return;
    }
    /* Bisect on what the function did wrong (function error, timeout, an error status); not
     * when it could not be reached at all. */
    bool bisect = res->outcome == ESMD_INVOKE_FUNCTION_ERROR ||
                  res->outcome == ESMD_INVOKE_TIMEOUT || res->status > 0 || why != NULL;
    esmd_mapping_part_failed(inf, res, bisect);
}

struct failed_ctx {
    const bool *failed;
    const struct part_records *pr;
    const struct esmd_shard *shard; /* shard of the previous record */
    bool seen_failure;              /* in that shard */
};

/* Streams: per shard, the records before its first failed one succeeded. */
static bool keep_before_first_failure(void *ctx, size_t i, const struct esmd_record *r)
{
    struct failed_ctx *f = ctx;
    if (r->shard != f->shard) {
        f->shard = r->shard;
        f->seen_failure = false;
    }
    f->seen_failure = f->seen_failure || f->failed[i];
    return !f->seen_failure;
}

/* The function named some records in batchItemFailures. Returns NULL when settled, or why the
 * answer cannot be used (then the whole part failed). */
static const char *settle_partial(struct inflight *inf, const struct esmd_invoke_result *res,
                                  const struct part_records *pr, const bool *failed)
{
    struct esmd_mapping *map = inf->map;
    size_t nfailed = 0;
    for (size_t i = 0; i < pr->n; i++)
        nfailed += failed[i];
    esmd_series_inc(map->m.failed, (double)nfailed);
    set_last_result(map, "PROBLEM: Function reported %zu failed records", nfailed);
    if (map->ops->queue) {
        if (!map->ops->ack_record)
            return "partial batch responses need per-message deletes";
        /* the others are done: deleted; the failed ones come back later */
        for (size_t i = 0; i < pr->n; i++)
            if (!failed[i] && !pr->recs[i]->shard->revoked)
                map->ops->ack_record(map->conn, pr->recs[i]->shard->parent, pr->recs[i]);
        inflight_end(inf, true);
        return NULL;
    }
    /* streams: checkpoint before each shard's first failure, retry from there */
    struct failed_ctx fc = {failed, pr, NULL, false};
    if (esmd_mapping_split_part(inf, keep_before_first_failure, &fc)) {
        /* the part that succeeded is current: ack it, then the remainder */
        struct esmd_batch ok = inf->batch;
        for (size_t i = 0; i < ok.ngroups; i++)
            lane_finished(map, ok.groups[i].shard, ok.groups[i].ack_seq);
        release_part(map, &ok);
        inf->batch = inf->todo[--inf->ntodo];
        inf->encoded = false;
    }
    esmd_mapping_part_failed(inf, res, false);
    return NULL;
}

struct item_ctx {
    struct esmd_mapping *map;
    const struct part_records *pr;
};

static bool item_is(void *ctx, size_t i, const cJSON *id)
{
    struct item_ctx *ic = ctx;
    return ic->map->ops->item_is(ic->map->conn, ic->pr->recs[i], id);
}

/* report_batch_item_failures: a 200 answer is read for batchItemFailures. */
static void settle_response(struct inflight *inf, const struct esmd_invoke_result *res)
{
    struct esmd_mapping *map = inf->map;
    struct part_records pr = esmd_mapping_part_records(&inf->batch);
    bool *failed = esmd_xcalloc(pr.n ? pr.n : 1, sizeof(*failed));
    struct item_ctx ic = {map, &pr};
    const char *why = NULL;
    enum esmd_item_failures rc = esmd_mapping_parse_item_failures(
        res->body, res->body_len, pr.n, map->ops->item_is ? item_is : NULL, &ic, failed, &why);
    if (rc == ESMD_ITEMS_SOME)
        why = settle_partial(inf, res, &pr, failed);
    free(failed);
    free(pr.recs);
    if (rc == ESMD_ITEMS_NONE) {
        settle_success(inf);
    } else if (why) {
        struct esmd_log_ctx ctx = esmd_mapping_part_log(inf, res->request_id);
        esmd_log_limited(ESMD_LOG_WARN, &ctx, "bad-item-failures",
                         "batchItemFailures not usable (%s): the whole batch failed", why);
        settle_failure(inf, res, why);
    }
}

static void on_invoke_result(void *ud, const struct esmd_invoke_result *res)
{
    struct inflight *inf = ud;
    struct esmd_mapping *map = inf->map;
    inf->req = NULL;

    if (res->outcome == ESMD_INVOKE_CANCELLED ||
        (map->stopping && res->outcome != ESMD_INVOKE_OK)) {
        /* Not acked: the records are read again by whoever owns the shard next. A success
         * that arrives while stopping is still acked (the parts after it are not sent). */
        inflight_end(inf, true);
        return;
    }
    if (res->outcome == ESMD_INVOKE_THROTTLED) {
        esmd_series_inc(map->m.throttled, 1);
        set_last_result(map, "PROBLEM: Function call throttled");
        esmd_mapping_throttled(inf, res);
        return;
    }
    remember_response(inf, res);
    if (res->outcome != ESMD_INVOKE_OK)
        settle_failure(inf, res, NULL);
    else if (map->cfg->report_batch_item_failures)
        settle_response(inf, res);
    else
        settle_success(inf);
}

/* ---- lifecycle ---- */

static void metrics_init(struct esmd_mapping *map)
{
    struct esmd_buf labels = ESMD_BUF_INIT;
    esmd_metric_labels(&labels, "mapping", map->cfg->name, "function", map->cfg->function, NULL);
    const char *l = esmd_buf_cstr(&labels);
#define SERIES(field, type, name, help) map->m.field = esmd_series(esmd_metric(type, name, help), l)
    SERIES(polled, ESMD_COUNTER, "esmd_polled_events_total", "Records read from the source.");
    SERIES(invoked, ESMD_COUNTER, "esmd_invoked_events_total",
           "Records sent to the function, counted again on each retry.");
    SERIES(failed, ESMD_COUNTER, "esmd_failed_invoke_events_total",
           "Records in invocations that failed (function error, error, timeout).");
    SERIES(batches, ESMD_COUNTER, "esmd_batches_total", "Batches sent (first attempts).");
    SERIES(oversized, ESMD_COUNTER, "esmd_oversized_records_total",
           "Records larger than the 6 MB payload cap on their own: skipped, never sent.");
    SERIES(undecodable, ESMD_COUNTER, "esmd_undecodable_records_total",
           "Records the source could not decode (schema registry: SCHEMA_NOT_FOUND, "
           "DESERIALIZATION_ERROR): given up alone, never sent.");
    SERIES(retries, ESMD_COUNTER, "esmd_batch_retries_total", "Retries of failed batches.");
    SERIES(throttled, ESMD_COUNTER, "esmd_batch_throttles_total",
           "Batch invocations answered 429 (retried, not counted as attempts).");
    SERIES(lag, ESMD_GAUGE, "esmd_offset_lag", "Records behind the end of the source (sum).");
    SERIES(inflight, ESMD_GAUGE, "esmd_inflight_batches", "Batches being invoked or retried.");
    SERIES(pending, ESMD_GAUGE, "esmd_pending_records", "Records read and waiting for a batch.");
    SERIES(holds, ESMD_COUNTER, "esmd_source_holds_total",
           "Times the source was held (too many records waiting; Kafka).");
    SERIES(pauses, ESMD_COUNTER, "esmd_shard_pauses_total",
           "Times a shard's fetching was paused (backpressure, disabling, re-laning).");
    SERIES(dropped, ESMD_COUNTER, "esmd_dropped_events_total",
           "Records given up without an on-failure destination (retries or record age exhausted, "
           "over the payload cap): discarded.");
    SERIES(on_failure, ESMD_COUNTER, "esmd_on_failure_events_total",
           "Records given up and stored for the on-failure destination.");
    SERIES(bisections, ESMD_COUNTER, "esmd_batch_bisections_total",
           "Failed batches split in two (bisect_batch_on_function_error).");
    SERIES(filtered, ESMD_COUNTER, "esmd_filtered_out_events_total",
           "Records that matched none of the mapping's filters: acked without being sent.");
    SERIES(committed, ESMD_COUNTER, "esmd_committed_events_total",
           "Records acknowledged to the source (sum of committed offset deltas).");
#undef SERIES
    map->committed_base = esmd_series_value(map->m.committed);
    esmd_buf_free(&labels);
}

/* esmd_mapping_on_failure{mapping,function,destination}: 1 for the on-failure destination in
 * force, 0 for one the mapping had before (the join with the outbox depth, docs/metrics.md). */
static void on_failure_mark(const struct esmd_mapping *map, double v)
{
    if (!map->on_failure)
        return;
    char *dest = esmd_dest_label(map->on_failure);
    struct esmd_buf l = ESMD_BUF_INIT;
    esmd_metric_labels(&l, "mapping", map->cfg->name, "function", map->cfg->function, "destination",
                       dest, NULL);
    esmd_series_set(esmd_series(esmd_metric(ESMD_GAUGE, "esmd_mapping_on_failure",
                                            "1 for the mapping's on-failure destination in force "
                                            "(0: one it had before)."),
                                esmd_buf_cstr(&l)),
                    v);
    esmd_buf_free(&l);
    free(dest);
}

static void set_on_failure(struct esmd_mapping *map, const char *uri)
{
    on_failure_mark(map, 0);
    free(map->on_failure);
    map->on_failure = uri ? esmd_xstrdup(uri) : NULL;
    on_failure_mark(map, 1);
}

static void on_stats(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_mapping *map = w->data;
    struct esmd_connector_stats st = {.lag = -1};
    map->ops->stats(map->conn, &st);
    if (st.lag >= 0)
        esmd_series_set(map->m.lag, (double)st.lag);
    double committed = esmd_series_value(map->m.committed);
    if (map->committed_base + (double)st.committed > committed)
        esmd_series_inc(map->m.committed, map->committed_base + (double)st.committed - committed);
    esmd_mapping_watch_tick(map, st.lag, esmd_now_ms());
}

static void free_filters(struct esmd_mapping *map)
{
    for (int d = 0; d < 3; d++) {
        if (d == 0 || !map->alias_filters)
            esmd_filter_free(map->filters[d]);
        map->filters[d] = NULL;
    }
    esmd_buf_free(&map->filter_doc);
}

/* One matcher per way the record's data can appear (enum esmd_filter_data). Without fallback
 * (SQS, Kinesis: docs/lambda.md#filter-non-json) all three are the patterns as written. With
 * Lambda's Kafka fallback (docs/lambda.md#kafka-filtering): when the data and a pattern's condition
 * on it disagree, only the pattern's other conditions apply — so [JSON] (an object or array) keeps
 * object conditions and drops value-list ones, [TEXT] (a scalar or text) keeps value-list
 * conditions and drops object ones, [NONE] (not UTF-8) drops every data condition. Only top-level
 * data conditions; patterns were checked at config load. */
static int compile_filters(const struct esmd_mapping *map, const char *const *patterns, size_t n,
                           struct esmd_filter *out[3], bool *alias, char *err, size_t errlen)
{
    const char *key = map->ops->data_key;
    const char *const skip[] = {key, NULL};
    bool fallback = map->ops->filter_fallback && key;
    int nmatchers = fallback ? 3 : 1;
    for (int d = 0; d < 3; d++)
        out[d] = d < nmatchers ? esmd_filter_new() : NULL;
    for (size_t i = 0; i < n; i++) {
        const char *p = patterns[i];
        size_t len = strlen(p);
        bool has_data = false, object_data = false;
        if (fallback) {
            cJSON *j = cJSON_ParseWithLength(p, len);
            const cJSON *data = cJSON_GetObjectItemCaseSensitive(j, key);
            has_data = data != NULL;
            object_data = cJSON_IsObject(data);
            cJSON_Delete(j);
        }
        for (int d = 0; d < nmatchers; d++) {
            bool strip = has_data && (d == ESMD_FILTER_DATA_NONE ||
                                      (d == ESMD_FILTER_DATA_JSON && !object_data) ||
                                      (d == ESMD_FILTER_DATA_TEXT && object_data));
            struct esmd_filter_error fe;
            int rc = strip ? esmd_filter_add_skip(out[d], p, len, (uint32_t)i, skip, &fe)
                           : esmd_filter_add(out[d], p, len, (uint32_t)i, &fe);
            if (rc != 0) {
                snprintf(err, errlen, "filters[%zu]: %s (at %d:%d of %s)", i, fe.message, fe.line,
                         fe.column, p);
                for (int k = 0; k < nmatchers; k++) {
                    esmd_filter_free(out[k]);
                    out[k] = NULL;
                }
                return ESMD_EINVAL;
            }
        }
    }
    *alias = nmatchers == 1;
    for (int d = nmatchers; d < 3; d++)
        out[d] = out[0];
    return 0;
}

static void set_patterns(struct esmd_mapping *map, const char *const *patterns, size_t n)
{
    for (size_t i = 0; i < map->npatterns; i++)
        free(map->patterns[i]);
    free(map->patterns);
    map->patterns = n ? esmd_xcalloc(n, sizeof(*map->patterns)) : NULL;
    for (size_t i = 0; i < n; i++)
        map->patterns[i] = esmd_xstrdup(patterns[i]);
    map->npatterns = n;
}

static void set_batch_size(struct esmd_mapping *map, int batch_size)
{
    map->batch_size = batch_size;
    for (size_t i = 0; i < map->nformers; i++)
        map->formers[i].b.lim.batch_size = batch_size;
    map->pending_high = (size_t)batch_size * 2;
    if (map->pending_high < PENDING_MIN_RECORDS)
        map->pending_high = PENDING_MIN_RECORDS;
    map->map_pending_high = (size_t)batch_size * 4;
    if (map->map_pending_high < MAP_PENDING_MIN_RECORDS)
        map->map_pending_high = MAP_PENDING_MIN_RECORDS;
    map->allow_records = map->map_pending_high; /* until the next pump (hold_or_let_go) */
    map->allow_bytes = MAP_PENDING_MAX_BYTES;
}

struct esmd_mapping *esmd_mapping_new(struct ev_loop *loop, const struct esmd_mapping_cfg *cfg,
                                      struct esmd_invoker *inv, const char *instance_id, char *err,
                                      size_t errlen)
{
    const struct esmd_connector_ops *ops = esmd_connector_of(cfg->kind);
    if (!ops) {
        snprintf(err, errlen, "mapping %s: source kind %d is not available in this build",
                 cfg->name, (int)cfg->kind);
        return NULL;
    }
    struct esmd_function *fn = esmd_invoker_function(inv, cfg->function);
    if (!fn) {
        snprintf(err, errlen, "mapping %s: function %s is not registered", cfg->name,
                 cfg->function);
        return NULL;
    }
    struct esmd_mapping *map = esmd_xcalloc(1, sizeof(*map));
    map->cfg = cfg;
    map->loop = loop;
    map->ops = ops;
    map->fn = fn;
    map->log.mapping = cfg->name;
    map->log.function = cfg->function;
    set_batch_size(map, cfg->batch_size);
    esmd_mapping_failure_init(map);
    map->enabled = true;
    map->factor = cfg->parallelization_factor > 1 ? cfg->parallelization_factor : 1;
    map->window_ms = cfg->maximum_batching_window_ms;
    set_on_failure(map, cfg->on_failure);
    snprintf(map->last_result, sizeof(map->last_result), "No records processed");
    if (cfg->nfilters > 0) {
        const char **pats = esmd_xcalloc(cfg->nfilters, sizeof(*pats));
        for (size_t i = 0; i < cfg->nfilters; i++)
            pats[i] = cfg->filters[i].pattern;
        char ferr[512];
        int rc = compile_filters(map, pats, cfg->nfilters, map->filters, &map->alias_filters, ferr,
                                 sizeof(ferr));
        if (rc == 0)
            set_patterns(map, pats, cfg->nfilters);
        free(pats);
        if (rc != 0) {
            snprintf(err, errlen, "mapping %s: %s", cfg->name, ferr);
            free(map->on_failure);
            free(map);
            return NULL;
        }
    }
    map->host = (struct esmd_host){
        .loop = loop,
        .core = map,
        .log = &map->log,
        .instance_id = instance_id,
        .shard_open = host_shard_open,
        .shard_close = host_shard_close,
        .emit = host_emit,
        .set_ready = host_set_ready,
    };
    map->conn = ops->create(cfg, &map->host, err, errlen);
    if (!map->conn) {
        free_filters(map);
        set_patterns(map, NULL, 0);
        free(map->on_failure);
        free(map);
        return NULL;
    }
    struct esmd_batch_limits lim = {
        .batch_size = map->batch_size,
        .max_bytes = ESMD_MAX_PAYLOAD,
        .envelope = ops->envelope_size(map->conn),
        .group_by_shard = ops->grouped,
    };
    /* Queue sources form one batch at a time: their shards are the connector's concurrency
     * slots, not ordering units, and SQS fills a batch before it sends it. Stream sources have
     * every former from the start: how many of them may hold a batch is the function's
     * max_concurrency at the time (pick_former), which a reload may raise or lower. */
    map->nformers = ops->queue ? 1 : MAX_FORMERS;
    map->formers = esmd_xcalloc(map->nformers, sizeof(*map->formers));
    for (size_t i = 0; i < map->nformers; i++) {
        struct former *f = &map->formers[i];
        f->map = map;
        esmd_batch_init(&f->b, &lim);
        ev_init(&f->window, on_window);
        f->window.data = f;
    }
    ev_prepare_init(&map->pump, on_prepare);
    map->pump.data = map;
    ev_init(&map->hold_timer, on_hold_timer);
    map->hold_timer.data = map;
    ev_timer_init(&map->stats_timer, on_stats, 1.0, 1.0);
    map->stats_timer.data = map;
    metrics_init(map);
    map->watch = esmd_mapping_watch_new(map);
    return map;
}

int esmd_mapping_start(struct esmd_mapping *map)
{
    ev_prepare_start(map->loop, &map->pump);
    ev_timer_start(map->loop, &map->stats_timer);
    int rc = map->ops->start(map->conn);
    if (rc != ESMD_OK)
        return rc;
    ESMD_INFO(&map->log, "mapping started (%s source, batch_size %d, window %lld ms)",
              map->ops->kind, map->batch_size, (long long)map->window_ms);
    poller_event(map, "STARTED");
    return ESMD_OK;
}

static void on_connector_stopped(void *ud)
{
    struct esmd_mapping *map = ud;
    on_stats(map->loop, &map->stats_timer, 0); /* final committed count */
    ev_timer_stop(map->loop, &map->stats_timer);
    ESMD_INFO(&map->log, "mapping stopped");
    if (map->stop_done)
        map->stop_done(map->stop_ud);
}

/* Waits for in-flight requests, then stops the connector. */
static void on_stop_check(struct ev_loop *loop, ev_idle *w, int revents)
{
    struct esmd_mapping *map = w->data;
    if (map->ninflight > 0)
        return;
    ev_idle_stop(loop, w);
    if (!map->connector_stopping) {
        map->connector_stopping = true;
        map->ops->stop(map->conn, on_connector_stopped, map);
    }
}

void esmd_mapping_stop(struct esmd_mapping *map, void (*done)(void *ud), void *ud)
{
    if (map->stopping)
        return;
    map->stopping = true;
    map->stop_done = done;
    map->stop_ud = ud;
    ev_prepare_stop(map->loop, &map->pump);
    /* Records not yet sent are given up without an ack: they are read again after restart. */
    for (size_t k = 0; k < map->nformers; k++) {
        struct former *f = &map->formers[k];
        ev_timer_stop(map->loop, &f->window);
        for (size_t i = 0; i < f->b.ngroups; i++) {
            f->b.groups[i].shard->state = ESMD_SHARD_IDLE;
            f->b.groups[i].shard->former = NULL;
            release_list(map, f->b.groups[i].head);
        }
        esmd_batch_clear(&f->b);
    }
    for (struct esmd_shard *s = map->shards; s; s = s->next) {
        for (int i = 0; i < s->nlanes; i++) {
            struct esmd_shard *lane = s->lanes[i];
            release_list(map, lane->pending_head);
            lane->pending_head = lane->pending_tail = NULL;
            lane->npending = lane->pending_bytes = 0;
        }
        s->all_npending = s->all_pending_bytes = 0;
        map->npending = 0;
        map->pending_bytes = 0;
        shard_pause(map, s);
    }
    if (map->ops->hold)
        source_hold(map, false); /* the connector serves its consumer's close */
    /* Batches waiting for a retry are abandoned now; those in flight finish, and so do those
     * whose given-up records are being stored for the on-failure destination (the store calls
     * back into the inflight: it acks them once they are stored). */
    for (struct inflight *inf = map->inflight, *next; inf; inf = next) {
        next = inf->next;
        if (!inf->req && inf->dest_pending == 0)
            inflight_end(inf, true);
    }
    ESMD_INFO(&map->log, "mapping stopping: %zu batches in flight", map->ninflight);
    ev_idle_init(&map->stop_check, on_stop_check);
    map->stop_check.data = map;
    ev_idle_start(map->loop, &map->stop_check);
}

void esmd_mapping_free(struct esmd_mapping *map)
{
    if (!map)
        return;
    map->stopping = true;
    set_on_failure(map, NULL); /* a mapping removed or restarted by a reload */
    ev_prepare_stop(map->loop, &map->pump);
    for (size_t k = 0; k < map->nformers; k++)
        ev_timer_stop(map->loop, &map->formers[k].window);
    ev_timer_stop(map->loop, &map->stats_timer);
    ev_timer_stop(map->loop, &map->hold_timer);
    ev_idle_stop(map->loop, &map->stop_check);
    while (map->inflight) {
        struct inflight *inf = map->inflight;
        if (inf->req) {
            struct esmd_invoke_req *req = inf->req;
            esmd_invoke_cancel(req); /* calls on_invoke_result → inflight_end */
        } else {
            inflight_end(inf, true);
        }
    }
    for (size_t k = 0; k < map->nformers; k++) {
        struct esmd_batch *b = &map->formers[k].b;
        for (size_t i = 0; i < b->ngroups; i++)
            release_list(map, b->groups[i].head);
        esmd_batch_clear(b);
        free(b->groups);
    }
    free(map->formers);
    while (map->shards) {
        struct esmd_shard *s = map->shards;
        map->shards = s->next;
        for (int i = s->nlanes - 1; i >= 0; i--) {
            release_list(map, s->lanes[i]->pending_head);
            esmd_shard_free(s->lanes[i]);
        }
    }
    /* Every record is back with the connector now, which destroy() relies on (librdkafka's
     * destroy waits for every message). A record still out is a bug here: a connector that
     * cannot be destroyed with records out is detached (its watchers stopped, nothing calls
     * into this freed mapping) and left behind rather than hang or free what the record points
     * to. */
    if (map->nheld == 0 || !map->ops->detach) {
        if (map->nheld > 0)
            ESMD_ERROR(&map->log, "%zu records not released (bug)", map->nheld);
        map->ops->destroy(map->conn);
    } else {
        ESMD_ERROR(&map->log, "%zu records not released: source connector detached (bug)",
                   map->nheld);
        map->ops->detach(map->conn);
    }
    free_filters(map);
    set_patterns(map, NULL, 0);
    free(map->on_failure);
    free(map->not_ready_why);
    esmd_mapping_watch_free(map->watch);
    free(map);
}

void esmd_mapping_set_destinations(struct esmd_mapping *map, struct esmd_dests *dests)
{
    map->dests = dests;
}

/* ---- run-time changes ---- */

void esmd_mapping_set_enabled(struct esmd_mapping *map, bool enabled)
{
    if (map->enabled == enabled || map->stopping)
        return;
    map->enabled = enabled;
    ESMD_INFO(&map->log, "mapping %s", enabled ? "enabled" : "disabled");
    for (struct esmd_shard *s = map->shards; s; s = s->next) {
        if (!enabled)
            shard_pause(map, s);
        else if (s->paused && !s->relane && s->all_npending <= map->pending_high / 2)
            shard_resume(map, s);
    }
    if (!enabled && map->ops->hold)
        source_hold(map, false); /* every shard is paused: the source is served (rebalances) */
    for (size_t k = 0; k < map->nformers; k++) {
        if (!enabled)
            ev_timer_stop(map->loop, &map->formers[k].window); /* the forming batch waits */
        else
            flush(map, &map->formers[k]);
    }
    map->dirty = true;
}

bool esmd_mapping_enabled(const struct esmd_mapping *map)
{
    return map->enabled;
}

int esmd_mapping_update(struct esmd_mapping *map, const struct esmd_mapping_update *u, char *err,
                        size_t errlen)
{
    if (u->has_batch_size && (u->batch_size < 1 || u->batch_size > 10000)) {
        snprintf(err, errlen, "BatchSize: %d is out of range (1 to 10000)", u->batch_size);
        return ESMD_EINVAL;
    }
    if (u->has_window && (u->window_ms < 0 || u->window_ms > 300000)) {
        snprintf(err, errlen,
                 "MaximumBatchingWindowInSeconds: %lld ms is out of range (0 to 300 seconds)",
                 (long long)u->window_ms);
        return ESMD_EINVAL;
    }
    if (u->has_parallelization_factor &&
        (map->ops->queue || u->parallelization_factor < 1 ||
         u->parallelization_factor > ESMD_CFG_MAX_PARALLELIZATION)) {
        if (map->ops->queue)
            snprintf(err, errlen,
                     "ParallelizationFactor: a pgqueue source has no parallelization factor");
        else
            snprintf(err, errlen, "ParallelizationFactor: %d is out of range (1 to %d)",
                     u->parallelization_factor, ESMD_CFG_MAX_PARALLELIZATION);
        return ESMD_EINVAL;
    }
    if (u->has_on_failure && u->on_failure) {
        if (map->ops->queue) {
            snprintf(err, errlen,
                     "DestinationConfig: a pgqueue source has no on-failure destination (its "
                     "messages go to its dead_letter_queue)");
            return ESMD_EINVAL;
        }
        char derr[256];
        if (!map->dests || esmd_dests_check(map->dests, u->on_failure, derr, sizeof(derr)) != 0) {
            snprintf(err, errlen, "DestinationConfig.OnFailure.Destination: %s",
                     map->dests ? derr : "no destinations in this process");
            return ESMD_EINVAL;
        }
    }
    struct esmd_filter *nf[3] = {NULL, NULL, NULL};
    bool alias = false;
    if (u->has_filters) {
        char ferr[512];
        for (size_t i = 0; i < u->nfilters; i++) {
            size_t len = strlen(u->filters[i]);
            if (len > (size_t)map->cfg->max_filter_pattern_length) {
                snprintf(err, errlen,
                         "FilterCriteria.Filters[%zu].Pattern: %zu characters, more than the limit "
                         "of %d",
                         i, len, map->cfg->max_filter_pattern_length);
                return ESMD_EINVAL;
            }
        }
        if (u->nfilters > (size_t)map->cfg->max_filters) {
            snprintf(err, errlen, "FilterCriteria.Filters: %zu patterns, more than the limit of %d",
                     u->nfilters, map->cfg->max_filters);
            return ESMD_EINVAL;
        }
        if (u->nfilters > 0 &&
            compile_filters(map, u->filters, u->nfilters, nf, &alias, ferr, sizeof(ferr)) != 0) {
            snprintf(err, errlen, "FilterCriteria.%s", ferr);
            return ESMD_EINVAL;
        }
    }
    /* everything is valid: apply */
    if (u->has_filters) {
        free_filters(map);
        for (int d = 0; d < 3; d++)
            map->filters[d] = nf[d];
        map->alias_filters = alias;
        set_patterns(map, u->filters, u->nfilters);
    }
    if (u->has_batch_size)
        set_batch_size(map, u->batch_size);
    if (u->has_window)
        map->window_ms = u->window_ms;
    if (u->has_on_failure)
        set_on_failure(map, u->on_failure);
    if (u->has_parallelization_factor && u->parallelization_factor != map->factor) {
        /* Per-key order across the change: each shard stops fetching and is re-laned once
         * nothing of it is unfinished (relane_if_drained). */
        map->factor = u->parallelization_factor;
        for (struct esmd_shard *s = map->shards; s; s = s->next) {
            s->relane = s->nlanes != map->factor;
            if (s->relane)
                shard_pause(map, s);
        }
    }
    ESMD_INFO(&map->log,
              "mapping updated: batch_size %d, window %lld ms, parallelization_factor %d, %zu "
              "filters, on_failure %s",
              map->batch_size, (long long)map->window_ms, map->factor, map->npatterns,
              map->on_failure ? map->on_failure : "none");
    map->dirty = true;
    return 0;
}

int esmd_mapping_batch_size(const struct esmd_mapping *map)
{
    return map->batch_size;
}

int esmd_mapping_parallelization_factor(const struct esmd_mapping *map)
{
    return map->factor;
}

int64_t esmd_mapping_window_ms(const struct esmd_mapping *map)
{
    return map->window_ms;
}

size_t esmd_mapping_nfilters(const struct esmd_mapping *map)
{
    return map->npatterns;
}

const char *esmd_mapping_filter(const struct esmd_mapping *map, size_t i)
{
    return i < map->npatterns ? map->patterns[i] : NULL;
}

const char *esmd_mapping_on_failure(const struct esmd_mapping *map)
{
    return map->on_failure;
}

void esmd_mapping_set_cfg(struct esmd_mapping *map, const struct esmd_mapping_cfg *cfg)
{
    map->cfg = cfg;
    map->log.mapping = cfg->name;
    map->log.function = cfg->function;
}

const struct esmd_mapping_cfg *esmd_mapping_cfg(const struct esmd_mapping *map)
{
    return map->cfg;
}

const char *esmd_mapping_name(const struct esmd_mapping *map)
{
    return map->cfg->name;
}

bool esmd_mapping_ready(const struct esmd_mapping *map)
{
    return map->ready;
}

const char *esmd_mapping_last_result(const struct esmd_mapping *map)
{
    return map->last_result;
}

void esmd_mapping_describe(const struct esmd_mapping *map, struct esmd_buf *out)
{
    struct esmd_connector_stats st = {.lag = -1};
    map->ops->stats(map->conn, &st);
    esmd_buf_printf(out, "{\"ready\":%s,\"reason\":", map->ready ? "true" : "false");
    if (map->not_ready_why)
        esmd_buf_put_json_string(out, map->not_ready_why, strlen(map->not_ready_why));
    else
        esmd_buf_puts(out, "null");
    esmd_buf_printf(out,
                    ",\"shards\":%zu,\"inflight_batches\":%zu,\"pending_records\":%zu,"
                    "\"lag\":%lld,\"last_processing_result\":",
                    map->nshards, map->ninflight, map->npending, (long long)st.lag);
    esmd_buf_put_json_string(out, map->last_result, strlen(map->last_result));
    esmd_buf_printf(out,
                    ",\"enabled\":%s,\"batch_size\":%d,\"maximum_batching_window_ms\":%lld,"
                    "\"parallelization_factor\":%d,\"filters\":%zu,\"on_failure\":",
                    map->enabled ? "true" : "false", map->batch_size, (long long)map->window_ms,
                    map->factor, map->npatterns);
    if (map->on_failure)
        esmd_buf_put_json_string(out, map->on_failure, strlen(map->on_failure));
    else
        esmd_buf_puts(out, "null");
    esmd_mapping_watch_describe(map, out);
    esmd_buf_putc(out, '}');
}
