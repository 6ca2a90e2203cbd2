-- An entry at the very end of the ID space (explicit ID 18446744073709551615-*) makes every later XADD '*'
-- fail. Remove it and move the stream's and the group's last ID back to the newest remaining entry, so
-- queueing works again. Every remaining entry was already delivered (the group read up to the bad one).
-- KEYS[1] the job stream; ARGV[1] the bad entry id, ARGV[2] consumer group
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last = '0-1'
if #top > 0 then last = top[1][1] end
redis.call('XSETID', KEYS[1], last, 'MAXDELETEDID', last)
redis.call('XGROUP', 'SETID', KEYS[1], ARGV[2], last)
return last
