-- with: record_event
-- Append events to their jobs' replay streams and publish them, each only while its caller still owns the job.
-- One call carries one event or several, each applied on its own as if called alone: a worker sends the events
-- its jobs produced during one round trip in one call, so the script's fixed cost is paid once per round trip
-- (protocol/publish_batch.py). On a Redis Cluster a call carries one event (its keys share one slot).
-- KEYS, per event: state hash, replay stream, cancel key.
-- ARGV[1] replay max length, ARGV[2] ttl (s); then per event: fencing token, event JSON without its opening brace
-- (it starts with "type":"<kind>"), the seq the caller expects this event to get.
-- Returns per event its seq, -1 when fenced (another worker took the job over), -2 when the job was cancelled
-- (states.PublishRefused). Statuses written: states.JobStatus (done / failed / cancelled).
-- The channel and the kind are derived here, not sent: this runs once per streamed event, so bytes count.
local maxlen, ttl = ARGV[1], ARGV[2]

local function publish(state_key, events_key, cancel_key, token, body, expected_text)
  local expected = tonumber(expected_text)
  local state = redis.call('HMGET', state_key, 'seq', 'owner')
  local seq = tonumber(state[1] or '0')
  local owner = state[2]
  -- A call re-sent after a timeout (the first one ran during a Redis stall): already applied, do not repeat it.
  if seq >= expected and (owner == token or redis.call('HGET', state_key, 'ended_by') == token) then
    return expected
  end
  if owner ~= token then return -1 end
  local kind = string.match(body, '^"type":"(%a+)"')
  local terminal = kind == 'done' or kind == 'failed' or kind == 'cancelled'
  if (not terminal) and redis.call('EXISTS', cancel_key) == 1 then return -2 end
  -- The append first: when it fails (the key holds another type), the seq is not counted either, so a retry
  -- fails the same way instead of reading as already applied. Redis does not undo a script's earlier writes.
  seq = seq + 1
  -- The caller's text of the seq when it is the one given (always, but after a gap): Lua formats a number with
  -- sprintf, and this runs once per streamed event.
  local seq_text = seq == expected and expected_text or tostring(seq)
  record(state_key, events_key, seq_text, body, maxlen)
  if terminal then
    redis.call('HSET', state_key, 'status', kind, 'owner', '', 'ended_by', token)
    redis.call('EXPIRE', state_key, ttl)
    redis.call('EXPIRE', events_key, ttl)
  elseif seq == 1 then
    redis.call('EXPIRE', events_key, ttl)
  end
  return seq
end

local results = {}
for i = 0, #KEYS / 3 - 1 do
  local k, a = 3 * i, 3 * i + 2
  results[i + 1] = publish(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
end
return results
