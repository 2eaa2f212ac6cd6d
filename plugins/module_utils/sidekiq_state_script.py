"""The server-side Lua script that gathers Sidekiq's whole state in one call, and the code that sends it.

Sidekiq's own Ruby API needs one round trip per queue for latency and one per process for its work, so
its cost grows with the fleet. This script reads everything inside Redis in a single EVALSHA. It returns
only small values: sizes, the oldest job's ``enqueued_at`` per queue, due and upcoming scheduled and retry
jobs per queue, and each process's heartbeat fields with its busy threads and oldest ``run_at`` per queue.

The script never writes. Commands that fail on a key of the wrong type go through ``redis.pcall`` and JSON
is decoded under ``pcall``, so such a key or an entry that is not valid JSON comes back as a short reason
instead of aborting the whole read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Keys the script reads, relative to the namespace prefix (Sidekiq 6.4, checked against its launcher and
# API source; 6.5+ moved the per-thread work hash from "<identity>:workers" to "<identity>:work"):
#   queues, queue:<name>, schedule, retry, dead, processes, <identity>, <identity>:workers,
#   <identity>:work, stat:processed, stat:failed
#
# ARGV[1] is the key prefix ("" or "<namespace>:"), ARGV[2] the maximum number of due entries decoded per
# job set, and ARGV[3] the seconds ahead in which scheduled and retry entries count as upcoming. The reply
# is one JSON document, because redis-py parsed a nested reply for 10,000 queues about three times slower
# than Python's json module parses the same data. Lua's cjson writes numbers with only 14 significant
# digits, so timestamps go back as strings: as written in the job, or formatted with 17 digits after a
# full decode. In the JSON, an empty Lua table appears as {} and a nil reply as false.
READ_STATE_LUA = r"""
local prefix = ARGV[1]
local due_scan_limit = tonumber(ARGV[2])
local upcoming_window = tonumber(ARGV[3] or '0')

local clock = redis.call('TIME')
local now_text = clock[1] .. '.' .. string.format('%06d', tonumber(clock[2]))
-- The end of the upcoming window, written from the integer seconds so that no precision is lost.
local upcoming_until = (tonumber(clock[1]) + upcoming_window) .. '.' .. string.format('%06d', tonumber(clock[2]))

local function call(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err ~= nil then
    return nil, reply.err
  end
  return reply, nil
end

local function decode_object(raw)
  local ok, value = pcall(cjson.decode, raw)
  if not ok then
    return nil, 'invalid JSON'
  end
  if type(value) ~= 'table' then
    return nil, 'JSON is not an object'
  end
  return value, nil
end

local function flatten_counts(counts)
  local flat = {}
  for name, count in pairs(counts) do
    flat[#flat + 1] = name
    flat[#flat + 1] = count
  end
  return flat
end

local function add(counts, name)
  counts[name] = (counts[name] or 0) + 1
end

local errors = {}

-- Lifetime counters and job set sizes.
local counters = {}
for _, name in ipairs({'stat:processed', 'stat:failed'}) do
  local value, err = call('GET', prefix .. name)
  if err then
    errors[#errors + 1] = name
    errors[#errors + 1] = err
    value = false
  end
  counters[#counters + 1] = value
end

local job_sets = {}
for _, name in ipairs({'schedule', 'retry', 'dead'}) do
  local size, err = call('ZCARD', prefix .. name)
  local due = 0
  if err then
    errors[#errors + 1] = name
    errors[#errors + 1] = err
    size = 0
  elseif name ~= 'dead' then
    due = redis.call('ZCOUNT', prefix .. name, '-inf', now_text)
  end
  job_sets[#job_sets + 1] = size
  job_sets[#job_sets + 1] = due
end

-- Return a job's enqueued_at as text, or '' and the reason it cannot be read.
local function oldest_enqueued_at(raw)
  -- Sidekiq's client adds enqueued_at as the last key of the job, so the text usually ends with
  -- ,"enqueued_at":<number>}. That member belongs to the top-level object, because the final } closes it,
  -- and its number is returned as written. Any other form is decoded in full.
  local text = string.match(raw, '[,{]"enqueued_at":(-?[%d%.eE%+%-]+)}$')
  if text and tonumber(text) then
    return text, ''
  end
  local job, job_err = decode_object(raw)
  if job_err then
    return '', job_err
  elseif job['enqueued_at'] == nil then
    return '', 'no enqueued_at'
  elseif type(job['enqueued_at']) ~= 'number' then
    return '', 'enqueued_at is not a number'
  end
  return string.format('%.17g', job['enqueued_at']), ''
end

-- Queues: size and the oldest job's enqueued_at (the job at index -1, because Sidekiq pushes on the left
-- and fetches from the right).
local queues = {}
local queue_names, queues_err = call('SMEMBERS', prefix .. 'queues')
if queues_err then
  errors[#errors + 1] = 'queues'
  errors[#errors + 1] = queues_err
  queue_names = {}
end
for _, name in ipairs(queue_names) do
  local key = prefix .. 'queue:' .. name
  local size, size_err = call('LLEN', key)
  local enqueued_at = ''
  local problem = ''
  if size_err then
    size = 0
    problem = 'queue key is not a list'
  elseif size > 0 then
    enqueued_at, problem = oldest_enqueued_at(redis.call('LINDEX', key, -1))
  end
  queues[#queues + 1] = name
  queues[#queues + 1] = size
  queues[#queues + 1] = enqueued_at
  queues[#queues + 1] = problem
end

-- Due scheduled and retry jobs per queue: a job's queue is its "queue" field, so the due entries are
-- decoded here, at most due_scan_limit of them per set. Entries due within the upcoming window are counted
-- the same way, but an unreadable one is not reported, because it is reported once it is due.
local function due_by_queue(name)
  local entries, err = call('ZRANGEBYSCORE', prefix .. name, '-inf', now_text, 'LIMIT', 0, due_scan_limit)
  if err then
    return {0, {}, {}, 0, 0, {}}
  end
  local counts = {}
  local problems = {}
  for _, raw in ipairs(entries) do
    local job, job_err = decode_object(raw)
    if job_err then
      add(problems, job_err)
    elseif type(job['queue']) ~= 'string' then
      add(problems, 'no queue name')
    else
      add(counts, job['queue'])
    end
  end
  local upcoming = redis.call('ZCOUNT', prefix .. name, '(' .. now_text, upcoming_until)
  local upcoming_entries = {}
  if upcoming > 0 then
    upcoming_entries = redis.call(
      'ZRANGEBYSCORE', prefix .. name, '(' .. now_text, upcoming_until, 'LIMIT', 0, due_scan_limit
    )
  end
  local upcoming_counts = {}
  for _, raw in ipairs(upcoming_entries) do
    local job, job_err = decode_object(raw)
    if not job_err and type(job['queue']) == 'string' then
      add(upcoming_counts, job['queue'])
    end
  end
  return {
    #entries, flatten_counts(counts), flatten_counts(problems),
    upcoming, #upcoming_entries, flatten_counts(upcoming_counts),
  }
end

-- Return a work entry's run_at as text, or nil. Sidekiq 6.4 writes {"queue":...,"payload":...,"run_at":<epoch s>}
-- with run_at last, so the text usually ends with it; the payload is a JSON string, so its quotes are escaped
-- and cannot end the text this way. Any other form is decoded in full by the caller.
local function trailing_run_at(raw)
  local text = string.match(raw, '[,{]"run_at":(-?[%d%.eE%+%-]+)}$')
  if text and tonumber(text) then
    return text
  end
  return nil
end

local function decoded_run_at(entry)
  if type(entry['run_at']) == 'number' then
    return string.format('%.17g', entry['run_at'])
  end
  return nil
end

-- Keep the earliest run_at per queue, comparing numerically, and count entries without one.
local function note_run_at(oldest, unknown, queue, run_at)
  if run_at == nil then
    add(unknown, queue)
  elseif oldest[queue] == nil or tonumber(run_at) < tonumber(oldest[queue]) then
    oldest[queue] = run_at
  end
end

-- Processes: heartbeat fields and, from the work hashes, how many threads are busy on each queue and since when
-- the oldest job of each queue runs.
local processes = {}
local identities, processes_err = call('SMEMBERS', prefix .. 'processes')
if processes_err then
  errors[#errors + 1] = 'processes'
  errors[#errors + 1] = processes_err
  identities = {}
end
for _, identity in ipairs(identities) do
  local key = prefix .. identity
  local exists = redis.call('EXISTS', key)
  local fields, hash_err = call('HMGET', key, 'info', 'busy', 'beat', 'quiet', 'rss', 'concurrency')
  if hash_err then
    fields = {false, false, false, false, false, false}
  else
    hash_err = ''
  end
  local work = {}
  local work_problems = {}
  local oldest_run_at = {}
  local unknown_run_at = {}
  for _, suffix in ipairs({':workers', ':work'}) do
    local entries, work_err = call('HGETALL', key .. suffix)
    if work_err then
      add(work_problems, 'work key is not a hash')
    else
      for index = 2, #entries, 2 do
        local raw = entries[index]
        -- Sidekiq writes the work entry as {"queue":...,"payload":...,"run_at":...}, with "queue" first, so an
        -- anchored match finds the top-level queue without decoding the payload. Anything else is decoded.
        local queue = string.match(raw, '^{"queue":"([^"\\]*)"')
        local run_at = queue and trailing_run_at(raw)
        if queue and run_at then
          add(work, queue)
          note_run_at(oldest_run_at, unknown_run_at, queue, run_at)
        else
          local entry, entry_err = decode_object(raw)
          if entry_err then
            add(work_problems, entry_err)
          elseif type(entry['queue']) ~= 'string' then
            add(work_problems, 'no queue name')
          else
            add(work, entry['queue'])
            note_run_at(oldest_run_at, unknown_run_at, entry['queue'], decoded_run_at(entry))
          end
        end
      end
    end
  end
  processes[#processes + 1] = {
    identity, exists, hash_err, fields[1], fields[2], fields[3], fields[4], fields[5], fields[6],
    flatten_counts(work), flatten_counts(work_problems),
    flatten_counts(oldest_run_at), flatten_counts(unknown_run_at),
  }
end

return cjson.encode({
  {clock[1], clock[2]},
  counters,
  job_sets,
  queues,
  due_by_queue('schedule'),
  due_by_queue('retry'),
  processes,
  errors,
})
"""

# Seconds ahead in which scheduled and retry jobs count as upcoming: the scaling policy's UPCOMING_WINDOW.
DEFAULT_UPCOMING_WINDOW = 60

READ_STATE_SHA1 = hashlib.sha1(READ_STATE_LUA.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ScriptReply:
    """The decoded reply of the read script and the number of Redis round trips it took."""

    reply: list[Any]
    round_trips: int


def run_read_script(
    client: Any, prefix: str, due_scan_limit: int, upcoming_window: int = DEFAULT_UPCOMING_WINDOW
) -> ScriptReply:
    """Run the read script with EVALSHA, sending the body with EVAL only when Redis has not cached it yet.

    That costs one round trip normally and two after a Redis restart or SCRIPT FLUSH. SCRIPT LOAD is not
    used, so a Redis user needs only EVAL, EVALSHA, TIME and the read commands. `upcoming_window` is in whole
    seconds.
    """
    from redis.exceptions import NoScriptError

    arguments = (0, prefix, due_scan_limit, upcoming_window)
    try:
        raw = client.evalsha(READ_STATE_SHA1, *arguments)
        round_trips = 1
    except NoScriptError:
        raw = client.eval(READ_STATE_LUA, *arguments)
        round_trips = 2
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    return ScriptReply(reply=json.loads(text), round_trips=round_trips)
