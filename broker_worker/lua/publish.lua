-- Append one event to the job's replay stream and publish it, only while the caller still owns the job.
-- KEYS[1] state hash, KEYS[2] replay stream, KEYS[3] cancel key
-- ARGV[1] fencing token, ARGV[2] channel, ARGV[3] event type, ARGV[4] event JSON without its opening brace,
-- ARGV[5] replay max length, ARGV[6] ttl (s)
-- Returns the event's seq, -1 when fenced (another worker took the job over), -2 when the job was cancelled.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
local kind = ARGV[3]
local terminal = kind == 'done' or kind == 'failed' or kind == 'cancelled'
if (not terminal) and redis.call('EXISTS', KEYS[3]) == 1 then return -2 end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local message = '{"seq":' .. seq .. ',' .. ARGV[4]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'e', message)
redis.call('PUBLISH', ARGV[2], message)
if terminal then
  redis.call('HSET', KEYS[1], 'status', kind, 'owner', '')
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
elseif seq == 1 then
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
return seq
