-- Append one event to the job's replay stream and publish it, only while the caller still owns the job.
-- KEYS[1] state hash, KEYS[2] replay stream, KEYS[3] cancel key
-- ARGV[1] fencing token, ARGV[2] event JSON without its opening brace (it starts with "type":"<kind>"),
-- ARGV[3] replay max length, ARGV[4] ttl (s), ARGV[5] the seq the caller expects this event to get
-- Returns the event's seq, -1 when fenced (another worker took the job over), -2 when the job was cancelled
-- (states.PublishRefused). Statuses written: states.JobStatus (done / failed / cancelled).
-- The channel and the kind are derived here, not sent: this runs once per streamed event, so bytes count.
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local expected = tonumber(ARGV[5])
local owner = redis.call('HGET', KEYS[1], 'owner')
-- A call re-sent after a timeout (the first one ran during a Redis stall): already applied, do not repeat it.
if seq >= expected and (owner == ARGV[1] or redis.call('HGET', KEYS[1], 'ended_by') == ARGV[1]) then
  return expected
end
if owner ~= ARGV[1] then return -1 end
local kind = string.match(ARGV[2], '^"type":"(%a+)"')
local terminal = kind == 'done' or kind == 'failed' or kind == 'cancelled'
if (not terminal) and redis.call('EXISTS', KEYS[3]) == 1 then return -2 end
seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local message = '{"seq":' .. seq .. ',' .. ARGV[2]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'e', message)
redis.call('SPUBLISH', string.gsub(KEYS[1], ':state$', ':chan'), message)
if terminal then
  redis.call('HSET', KEYS[1], 'status', kind, 'owner', '', 'ended_by', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
elseif seq == 1 then
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return seq
